"""The torch-free artifact contract: one identity, verification that nothing slips past, clear failures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantize.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ArtifactError,
    FileEntry,
    Manifest,
    artifact_id,
    read_manifest,
    sha256_file,
    verify_artifact,
)
from quantize.signing import sign_bytes


@pytest.fixture
def signed_copy(tiny_model_dir: Path, artifacts, signing_keys, tmp_path: Path) -> Path:
    private, _public, _path = signing_keys
    return Path(shutil.copytree(artifacts.get(tiny_model_dir, "int8", sign_key=private), tmp_path / "art"))


def _resign(root: Path, manifest: Manifest, private) -> None:
    """What a careless (or hostile) signer would publish: a manifest that lists what is there, signed."""
    data = manifest.canonical_bytes()
    (root / MANIFEST_NAME).write_bytes(data)
    (root / SIGNATURE_NAME).write_bytes(sign_bytes(data, private))


def test_artifact_id_is_the_sha256_of_manifest_json(signed_copy: Path) -> None:
    manifest, raw = read_manifest(signed_copy)
    assert artifact_id(manifest) == hashlib.sha256(raw).hexdigest() == sha256_file(signed_copy / MANIFEST_NAME)


def test_a_nested_file_named_like_the_manifest_is_not_exempt(signed_copy: Path, signing_keys) -> None:
    _private, public, _path = signing_keys
    (signed_copy / "transformer" / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ArtifactError, match=r"transformer/manifest\.json is not listed"):
        verify_artifact(signed_copy, [public])
    (signed_copy / "transformer" / MANIFEST_NAME).unlink()
    (signed_copy / "vae" / SIGNATURE_NAME).write_text("{}")
    with pytest.raises(ArtifactError, match=r"vae/manifest\.sig is not listed"):
        verify_artifact(signed_copy, [public])


def test_a_signed_index_may_not_point_outside_the_artifact(signed_copy: Path, signing_keys, tmp_path: Path) -> None:
    private, public, _path = signing_keys
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(sorted((signed_copy / "transformer").glob("model-*.safetensors"))[0], outside)
    index_path = signed_copy / "transformer" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], "../../elsewhere.safetensors")
    index_path.write_text(json.dumps(index))
    manifest, _raw = read_manifest(signed_copy)
    files = dict(manifest.files)
    files["transformer/model.safetensors.index.json"] = FileEntry(
        sha256=sha256_file(index_path), size=index_path.stat().st_size
    )
    _resign(signed_copy, manifest.model_copy(update={"files": files}), private)
    with pytest.raises(ArtifactError, match="leaves the artifact directory"):
        verify_artifact(signed_copy, [public])


def test_listed_paths_may_not_leave_the_artifact(signed_copy: Path, signing_keys, tmp_path: Path) -> None:
    private, public, _path = signing_keys
    (tmp_path / "secret.txt").write_text("x")
    manifest, _raw = read_manifest(signed_copy)
    files = {**manifest.files, "../secret.txt": FileEntry(sha256=sha256_file(tmp_path / "secret.txt"), size=1)}
    _resign(signed_copy, manifest.model_copy(update={"files": files}), private)
    with pytest.raises(ArtifactError, match=r"'\.\./secret\.txt' leaves the artifact directory"):
        verify_artifact(signed_copy, [public])


def test_symlinks_that_leave_the_artifact_are_refused(signed_copy: Path, signing_keys, tmp_path: Path) -> None:
    _private, public, _path = signing_keys
    shard = sorted((signed_copy / "transformer").glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    os.symlink(outside, shard)  # same bytes, same hash: only the link gives it away
    with pytest.raises(ArtifactError, match="leaves the artifact"):
        verify_artifact(signed_copy, [public])


def test_torch_free_modules_stay_torch_free() -> None:
    # The fleet controller, the node sidecar and `zimage-edge verify` run without the model stack.
    code = """
import importlib, pkgutil, sys
import fleet
modules = [
    "zimage_edge", "zimage_edge.cli", "zimage_edge.device", "zimage_edge.errors", "zimage_edge.request",
    "zimage_edge.cpu", "zimage_edge.model.layout", "zimage_edge.shapes.data", "zimage_edge.shapes.metric",
    "quantize.manifest", "quantize.signing", "quantize.identity", "quantize.models", "quantize.variants",
    "quantize.profiles", "quantize.planner", "quantize.calibration", "quantize.specs", "quantize.cli",
    "quantize.generate_cli", "edge_agent.errors", "edge_agent.logs", "edge_agent.middleware", "edge_agent.auth",
    "edge_agent.keys", "edge_agent.settings", "edge_agent.cache", "edge_agent.images", "edge_agent.state",
    "edge_agent.metrics", "edge_agent.batching", "edge_agent.jobs", "edge_agent.budget", "edge_agent.runner",
    "edge_agent.cli", "edge_agent.api_models", "edge_agent.openapi",
]
# fleet.migrations.env is Alembic's script, which only runs inside Alembic (it reads context.config); what it
# imports (fleet.store) is checked here with the rest.
modules += [m.name for m in pkgutil.walk_packages(fleet.__path__, "fleet.") if m.name != "fleet.migrations.env"]
for name in modules:
    importlib.import_module(name)
import zimage_edge.cli
zimage_edge.cli.build_parser()
loaded = sorted({"torch", "diffusers", "transformers"} & set(sys.modules))
assert not loaded, f"imported {loaded}"
print(len(modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 36


def test_verify_command_does_not_import_torch(signed_copy: Path, signing_keys) -> None:
    _private, _public, public_path = signing_keys
    code = f"""
import sys
from zimage_edge import cli
rc = cli.main(["verify", {str(signed_copy)!r}, "--trusted-key", {str(public_path)!r}])
assert rc == 0, rc
assert "torch" not in sys.modules, "verify imported torch"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "files verified, signature by key" in result.stdout


def test_quantize_onto_a_full_disk_is_one_clear_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from zimage_edge import cli

    disk = tmp_path / "small-disk"
    disk.mkdir()
    # A real full disk: a 1 MiB tmpfs (the tests run as root; the tiny model's artifact needs ~3 MiB).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        argv = ["quantize", "--source", str(tiny_model_dir), "--variant", "int8", "--out", str(disk / "art"), "-q"]
        rc = cli.main([*argv, "--quality-size", "64x64"])
        err = capsys.readouterr().err.strip()
        assert rc == 1
        assert err.count("\n") == 0, err
        assert "no space left on the device while writing" in err
        assert list(disk.iterdir()) == []  # the partial directory went too
    finally:
        subprocess.run(["umount", str(disk)], check=True)
