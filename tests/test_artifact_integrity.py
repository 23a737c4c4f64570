"""Tampering, missing files and signatures: a damaged or untrusted artifact is refused, naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import quantize.load as load_module
from quantize.load import load_artifact
from quantize.manifest import ArtifactError, verify_artifact
from quantize.models import load_model
from quantize.signing import KeyFileError, generate_keypair, load_public_key
from tests.conftest import CPU_FACTS


@pytest.fixture
def signed_copy(tiny_model_dir: Path, artifacts, signing_keys, tmp_path: Path) -> Path:
    private, _public, _path = signing_keys
    return Path(shutil.copytree(artifacts.get(tiny_model_dir, "int8", sign_key=private), tmp_path / "art"))


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records any attempt to build a pipeline: verification must refuse before that."""
    calls: list[Path] = []

    def record(root, *args, **kwargs):
        calls.append(root)
        raise AssertionError("load_components ran on an artifact that failed verification")

    monkeypatch.setattr(load_module, "load_components", record)
    return calls


def _first_weight(root: Path) -> Path:
    return sorted((root / "transformer").glob("model-*.safetensors"))[0]


def test_signed_artifact_verifies_and_loads(signed_copy: Path, signing_keys) -> None:
    _private, public, _path = signing_keys
    _manifest, key = verify_artifact(signed_copy, [public])
    assert key is not None
    loaded = load_artifact(signed_copy, facts=CPU_FACTS, trusted=[public])
    assert loaded.identity.manifest is not None


def test_one_flipped_byte_in_a_weight_file_is_refused(signed_copy: Path, signing_keys, no_load) -> None:
    _private, public, _path = signing_keys
    weight = _first_weight(signed_copy)
    data = bytearray(weight.read_bytes())
    data[len(data) // 2] ^= 0x01
    weight.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{weight.name} does not match its sha256"):
        load_artifact(signed_copy, facts=CPU_FACTS, trusted=[public])
    with pytest.raises(ArtifactError, match=weight.name):
        load_artifact(signed_copy, facts=CPU_FACTS)  # hashes are checked with or without trusted keys
    assert no_load == []


def test_edited_manifest_breaks_the_signature(signed_copy: Path, signing_keys, no_load) -> None:
    _private, public, _path = signing_keys
    path = signed_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["quality"]["psnr_db_min"] = 99.0  # a flattering lie
    path.write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    with pytest.raises(ArtifactError, match="signature does not verify"):
        load_artifact(signed_copy, facts=CPU_FACTS, trusted=[public])
    assert no_load == []


def test_manifest_hash_edited_to_match_a_replaced_file_needs_the_key(signed_copy: Path, signing_keys) -> None:
    # Without a signature an attacker could rewrite both; with a trusted key that is refused.
    from quantize.manifest import sha256_file

    _private, public, _path = signing_keys
    weight = _first_weight(signed_copy)
    weight.write_bytes(weight.read_bytes()[:-1] + b"\x00")
    path = signed_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    rel = weight.relative_to(signed_copy).as_posix()
    manifest["files"][rel]["sha256"] = sha256_file(weight)
    path.write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    with pytest.raises(ArtifactError, match="signature"):
        verify_artifact(signed_copy, [public])


def test_wrong_key_and_unsigned_artifacts_are_refused(
    signed_copy: Path, tiny_model_dir: Path, artifacts, tmp_path: Path
) -> None:
    _private_path, other_public = generate_keypair(tmp_path / "other")
    with pytest.raises(ArtifactError, match="does not verify with any trusted key"):
        verify_artifact(signed_copy, [load_public_key(other_public)])
    unsigned = artifacts.get(tiny_model_dir, "int8")
    with pytest.raises(ArtifactError, match=r"not signed \(manifest\.sig missing\)"):
        verify_artifact(unsigned, [load_public_key(other_public)])
    with pytest.raises(ArtifactError, match="not a signed artifact"):
        load_model(tiny_model_dir, facts=CPU_FACTS, trusted=[load_public_key(other_public)])


def test_missing_file_is_named(signed_copy: Path, no_load) -> None:
    victim = signed_copy / "text_encoder" / "quantization_map.json"
    victim.unlink()
    with pytest.raises(ArtifactError, match=r"text_encoder/quantization_map\.json is missing"):
        load_artifact(signed_copy, facts=CPU_FACTS)
    assert no_load == []


def test_unlisted_file_is_refused(signed_copy: Path, no_load) -> None:
    (signed_copy / "transformer" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"extra\.safetensors is not listed"):
        load_artifact(signed_copy, facts=CPU_FACTS)


def test_missing_manifest_is_not_an_artifact(signed_copy: Path) -> None:
    (signed_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        load_artifact(signed_copy, facts=CPU_FACTS)


def test_keys_are_never_overwritten(tmp_path: Path) -> None:
    generate_keypair(tmp_path)
    assert oct((tmp_path / "zimage-edge.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path)
