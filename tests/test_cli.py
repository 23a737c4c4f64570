from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from zimage_edge import cli


def test_generate_writes_images(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "img" / "out.png"
    argv = ["generate", "--model", str(tiny_model_dir), "a red circle", "-o", str(out)]
    rc = cli.main([*argv, "--width", "160", "--height", "128", "--seed", "5", "--num-images", "2", "-q"])
    assert rc == 0
    paths = [tmp_path / "img" / "out-0.png", tmp_path / "img" / "out-1.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (160, 128)
    printed = capsys.readouterr().out
    assert "(seed 5)" in printed
    assert "(seed 6)" in printed


def test_bad_request_fails_before_loading(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import quantize.models

    def must_not_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded for an invalid request")

    # Where the command looks it up: the generate command calls quantize.models.load_model.
    monkeypatch.setattr(quantize.models, "load_model", must_not_load)
    rc = cli.main(["generate", "--model", str(tiny_model_dir), "x", "--width", "100", "--steps", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "width: must be a multiple of 16, got 100" in err
    assert "steps: Input should be greater than or equal to 1" in err


def test_missing_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["generate", "--model", str(tmp_path / "none"), "x", "--width", "64", "--height", "64"])
    assert rc == 1
    assert "does not exist" in capsys.readouterr().err


def test_toy_model_refuses_existing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["toy-model", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_torch_free_modules_do_not_import_torch() -> None:
    # The fleet controller and protocol reuse these contracts on nodes without the model stack.
    code = (
        "import sys; import zimage_edge.cli, zimage_edge.device, zimage_edge.request, fleet, quantize.cli, "
        "quantize.manifest, quantize.signing, quantize.planner, quantize.profiles, quantize.specs; "
        "zimage_edge.cli.build_parser(); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_the_projects_own_errors_become_one_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import quantize.models

    def torch_bug(*_args, **_kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(quantize.models, "load_model", torch_bug)
    argv = ["generate", "--model", str(tiny_model_dir), "a red circle", "-o", str(tmp_path / "x.png"), "-q"]
    with pytest.raises(RuntimeError, match="illegal memory access"):  # a bug keeps its traceback
        cli.main(argv)

    from zimage_edge.model.loading import ModelLoadError

    def user_error(*_args, **_kwargs):
        raise ModelLoadError("model directory /nowhere does not exist")

    monkeypatch.setattr(quantize.models, "load_model", user_error)
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.strip() == "zimage-edge generate: model directory /nowhere does not exist"
