"""ed25519 signatures over artifact manifests.

Torch-free. ``manifest.sig`` is JSON: ``{"algorithm": "ed25519", "key_id": ..., "signature": base64}``;
the signature covers the exact bytes of ``manifest.json``, which lists the sha256 of every other
file, so one signature vouches for the whole artifact.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from zimage_edge.errors import ZimageEdgeError

PRIVATE_KEY_NAME = "zimage-edge.key"
PUBLIC_KEY_NAME = "zimage-edge.pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write a new private key (mode 0600) and its public key; refuses to overwrite."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private_path, public_path


class KeyFileError(ZimageEdgeError):
    """A key file is missing, unreadable or not an ed25519 key."""


def _read_key(path: Path, load: Callable[[bytes], object], kind: type, what: str) -> object:
    try:
        key = load(Path(path).read_bytes())
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM {what}: {exc}") from exc
    if not isinstance(key, kind):
        raise KeyFileError(f"{path} is not an ed25519 {what}")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = _read_key(
        path, lambda data: serialization.load_pem_private_key(data, password=None), Ed25519PrivateKey, "private key"
    )
    assert isinstance(key, Ed25519PrivateKey)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = _read_key(path, serialization.load_pem_public_key, Ed25519PublicKey, "public key")
    assert isinstance(key, Ed25519PublicKey)
    return key


def load_public_keys(paths: Iterable[str | Path] | None) -> list[Ed25519PublicKey]:
    """The trusted keys named on a command line or in settings (none when ``paths`` is empty)."""
    return [load_public_key(Path(p)) for p in paths or []]


def sign_bytes(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The ``manifest.sig`` document for ``data``."""
    document = {
        "algorithm": "ed25519",
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(data)).decode(),
    }
    return (json.dumps(document, sort_keys=True, indent=2) + "\n").encode()


class SignatureError(ZimageEdgeError):
    """A signature document is malformed or verifies with no trusted key."""


def verify_signature(document_bytes: bytes, manifest_bytes: bytes, trusted: list[Ed25519PublicKey], where: str) -> str:
    """Check a ``manifest.sig`` document against the trusted keys; returns the signing key's id.

    ``where`` names the document in error messages.
    """
    path = where
    try:
        document = json.loads(document_bytes)
        signature = base64.b64decode(document["signature"], validate=True)
        algorithm = document["algorithm"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{path} is not a valid signature document: {exc}") from exc
    if algorithm != "ed25519":
        raise SignatureError(f"{path}: unsupported signature algorithm {algorithm!r}")
    for key in trusted:
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return key_id(key)
    raise SignatureError(f"{path}: the manifest's signature does not verify with any trusted key")
