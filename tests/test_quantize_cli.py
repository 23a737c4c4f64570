from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from zimage_edge import cli


def test_keys_quantize_verify_generate(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keys", "generate", str(tmp_path / "keys")]) == 0
    key, pub = tmp_path / "keys" / "zimage-edge.key", tmp_path / "keys" / "zimage-edge.pub"
    out = tmp_path / "int8"
    rc = cli.main(
        ["quantize", "--source", str(tiny_model_dir), "--variant", "int8", "--out", str(out),
         "--quality-size", "64x64", "--sign-key", str(key), "-q"]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "quality passed" in printed
    assert "(signed)" in printed
    assert cli.main(["verify", str(out), "--trusted-key", str(pub)]) == 0
    assert "signature by key" in capsys.readouterr().out

    image = tmp_path / "x.png"
    rc = cli.main(
        ["generate", "--model", str(out), "a red circle", "-o", str(image), "--width", "64", "--height", "64",
         "--seed", "1", "--trusted-key", str(pub), "-q"]
    )  # fmt: skip
    assert rc == 0
    with Image.open(image) as img:
        assert img.size == (64, 64)


def test_quantize_bad_input_is_refused_before_work(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert cli.main(["quantize", "--source", str(tiny_model_dir), "--variant", "int8", "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    out = str(tmp_path / "a")
    assert (
        cli.main(["quantize", "--source", str(tiny_model_dir), "--variant", "int8", "--out", out, "--no-quality"]) == 2
    )
    assert "--no-quality needs --force" in capsys.readouterr().err
    rc = cli.main(
        ["quantize", "--source", str(tiny_model_dir), "--variant", "int8", "--out", out, "--quality-size", "big"]
    )
    assert rc == 2
    assert "must look like 1024x1024" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_quantize_refused_by_the_gate_exits_nonzero(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    rc = cli.main(
        ["quantize", "--source", str(tiny_model_dir), "--variant", "int4", "--out", str(tmp_path / "a"),
         "--quality-size", "64x64", "--min-psnr", "99", "-q"]
    )  # fmt: skip
    assert rc == 1
    assert "quality gate failed: PSNR" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_plan_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "--device", "t4-16gb", "--resolution", "1024x1024"]) == 0
    text = capsys.readouterr().out
    assert "int8-te8 with placement resident" in text
    assert cli.main(["plan", "--json", "--resolution", "512x512"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["profile"] for d in data} >= {"t4-16gb", "l4-24gb", "jetson-orin-nano-8gb"}
    assert all(d["choice"] is not None for d in data)
    assert cli.main(["plan", "--device", "jetson-orin-nano-8gb", "--batch", "2"]) == 0
    assert "nothing fits" in capsys.readouterr().out
    assert cli.main(["plan", "--device", "no-such-gpu"]) == 2
    assert "unknown device profile" in capsys.readouterr().err
    assert cli.main(["plan", "--detect", "--resolution", "256x256"]) == 0


def test_verify_reports_tampering(tiny_model_dir: Path, artifacts, tmp_path: Path, capsys) -> None:
    import shutil

    copy = Path(shutil.copytree(artifacts.get(tiny_model_dir, "int8"), tmp_path / "a"))
    (copy / "vae" / "config.json").write_text("{}")
    assert cli.main(["verify", str(copy)]) == 1
    assert "vae/config.json" in capsys.readouterr().err
