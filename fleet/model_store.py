"""The node's model store: artifacts downloaded with resume, verified, installed atomically, pruned.

Layout: ``ROOT/<artifact_id>/`` per installed artifact, and ``ROOT/.<artifact_id>.partial/`` while one
downloads. The partial directory keeps its name across restarts, so a download that was cut (a dead
link, a node reboot) resumes each file where it stopped with an HTTP ``Range`` request. Nothing is
installed until every file matches its sha256, the manifest's own sha256 is the artifact_id that was
asked for, and ``verify_artifact`` (with the trusted keys) passes; then one ``rename`` makes it
visible. Torch-free: the node sidecar runs without the model stack.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from quantize.manifest import (
    MANIFEST_NAME,
    PARTIAL_MARK,
    SIGNATURE_NAME,
    ArtifactError,
    Manifest,
    is_artifact,
    sha256_file,
    verify_artifact,
)
from zimage_edge.errors import ZimageEdgeError

# Network reads of 256 KiB: small enough for a bandwidth cap to act smoothly, large enough to be cheap.
READ_CHUNK = 256 * 1024
# Free space kept beyond an artifact's own bytes: the filesystem's own needs and logs must not hit 0.
DISK_MARGIN_BYTES = 256 * 1024 * 1024

Progress = Callable[[int, int], None]  # (bytes present, bytes in all)


class DownloadError(ZimageEdgeError):
    """An artifact could not be fetched or installed; the store is as it was (a partial copy may remain
    to resume from). ``reason`` is machine-readable for events and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class RateLimit:
    """At most ``bytes_per_s`` on average: sleeps after a read that got ahead of the allowance."""

    bytes_per_s: float
    started: float = 0.0
    taken: int = 0

    async def take(self, n: int) -> None:
        now = time.monotonic()
        if not self.started:
            self.started = now
        self.taken += n
        ahead = self.taken / self.bytes_per_s - (now - self.started)
        if ahead > 0:
            await asyncio.sleep(ahead)


@dataclass
class ModelStore:
    root: Path
    margin_bytes: int = DISK_MARGIN_BYTES

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, artifact_id: str) -> Path:
        return self.root / artifact_id

    def partial(self, artifact_id: str) -> Path:
        return self.root / f".{artifact_id}{PARTIAL_MARK}download"

    def has(self, artifact_id: str) -> bool:
        return is_artifact(self.path(artifact_id))

    def installed(self) -> list[str]:
        """Installed artifact ids, most recently installed last."""
        found = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_artifact(p)]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime_ns)]

    def prune(self, keep_last: int, protect: set[str]) -> list[str]:
        """Remove installed artifacts beyond the ``keep_last`` newest, never one in ``protect`` (the one
        running, the one to roll back to). Returns what was removed."""
        installed = self.installed()
        removable = [a for a in installed[: max(0, len(installed) - keep_last)] if a not in protect]
        for artifact_id in removable:
            shutil.rmtree(self.path(artifact_id))
        return removable

    async def fetch(
        self,
        session: aiohttp.ClientSession,
        url: str,
        artifact_id: str,
        *,
        trusted: list[Ed25519PublicKey] | None = None,
        bytes_per_s: float | None = None,
        on_progress: Progress | None = None,
    ) -> Path:
        """Download, verify and install ``artifact_id`` from the directory ``url`` (the controller serves
        ``.../artifacts/<artifact_id>``; ``artifact_url`` makes it); returns its directory. Already
        installed: nothing is fetched."""
        if self.has(artifact_id):
            return self.path(artifact_id)
        url = url.rstrip("/")
        raw = await _get_small(session, f"{url}/{MANIFEST_NAME}")
        if hashlib.sha256(raw).hexdigest() != artifact_id:
            raise DownloadError("identity", f"the manifest served for {artifact_id} is another artifact's")
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValueError as exc:
            raise DownloadError("manifest", f"the manifest of {artifact_id} is not valid: {exc}") from exc
        partial = self.partial(artifact_id)
        self._check_space(manifest, partial)
        partial.mkdir(exist_ok=True)
        limit = RateLimit(bytes_per_s) if bytes_per_s else None
        total = manifest.weight_bytes
        done = sum(_present(partial / rel) for rel in manifest.files)
        for rel, entry in sorted(manifest.files.items()):
            target = partial / rel
            if _present(target) == entry.size and await asyncio.to_thread(sha256_file, target) == entry.sha256:
                continue
            before = _present(target)
            got = await _download(session, f"{url}/{rel}", target, sha256=entry.sha256, size=entry.size, limit=limit)
            done += got - before
            if on_progress:
                on_progress(done, total)
            if await asyncio.to_thread(sha256_file, target) != entry.sha256:
                target.unlink()  # a corrupt copy is never resumed from
                raise DownloadError("hash", f"{rel} of {artifact_id} does not match its sha256 (altered or corrupt)")
        (partial / MANIFEST_NAME).write_bytes(raw)
        if trusted:
            (partial / SIGNATURE_NAME).write_bytes(await _get_small(session, f"{url}/{SIGNATURE_NAME}"))
        try:
            await asyncio.to_thread(verify_artifact, partial, trusted)
        except ArtifactError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise DownloadError("verify", str(exc)) from exc
        partial.rename(self.path(artifact_id))
        return self.path(artifact_id)

    def _check_space(self, manifest: Manifest, partial: Path) -> None:
        have = sum(_present(partial / rel) for rel in manifest.files) if partial.is_dir() else 0
        need = manifest.weight_bytes - have + self.margin_bytes
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise DownloadError(
                "disk", f"not enough disk for {manifest.artifact_id[:10]}: needs {need} bytes, {free} free"
            )


def artifact_url(base_url: str, artifact_id: str) -> str:
    """Where a controller at ``base_url`` serves an artifact's directory."""
    return f"{base_url.rstrip('/')}/artifacts/{artifact_id}"


def _present(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


async def _get_small(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as response:
        if response.status != 200:
            raise DownloadError("http", f"GET {url}: {response.status}")
        return await response.read()


async def _download(
    session: aiohttp.ClientSession, url: str, target: Path, *, sha256: str, size: int, limit: RateLimit | None
) -> int:
    """Fetch ``url`` into ``target``, resuming from what is there; returns the bytes now present."""
    target.parent.mkdir(parents=True, exist_ok=True)
    offset = _present(target)
    if offset > size:
        await asyncio.to_thread(target.unlink)
        offset = 0
    headers = {"Range": f"bytes={offset}-", "If-Range": f'"{sha256}"'} if offset else {}
    async with session.get(url, headers=headers) as response:
        if response.status == 206:
            mode = "ab"
        elif response.status == 200:
            mode, offset = "wb", 0  # the server sent the whole file: start over
        else:
            raise DownloadError("http", f"GET {url}: {response.status}")
        with target.open(mode) as handle:
            async for chunk in response.content.iter_chunked(READ_CHUNK):
                await asyncio.to_thread(handle.write, chunk)
                offset += len(chunk)
                if limit:
                    await limit.take(len(chunk))
    return offset
