"""Serving artifacts to nodes over HTTP: verified at registration, files by their manifest, resumable.

``GET /artifacts/<artifact_id>/<path>`` serves ``manifest.json``, ``manifest.sig`` and exactly the files
the manifest lists (nothing else in the directory is reachable). Each answer carries the file's sha256
as its strong ``ETag`` (for ``manifest.json`` that is the artifact_id itself), and a single-range
``Range: bytes=START-[END]`` request gets a 206, so a node whose download was cut resumes where it
stopped; ``If-Range`` with another ETag gets the whole file again. Torch-free.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from quantize.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, verify_artifact

# Files go out in 1 MiB reads, each read in a thread so the loop never waits on the disk.
CHUNK = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_ID = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Served:
    """One answer, for metrics and tests: which file, from which offset, how many bytes went out."""

    artifact_id: str
    path: str
    start: int
    sent: int


@dataclass
class ArtifactCatalog:
    """The artifacts this controller distributes, by artifact_id."""

    entries: dict[str, tuple[Path, Manifest]] = field(default_factory=dict)
    served: list[Served] = field(default_factory=list)

    def add(self, directory: Path, trusted: list[Ed25519PublicKey] | None = None) -> Manifest:
        """Verify ``directory`` (hashes, and the signature with trusted keys) and register it (blocking)."""
        manifest, _key = verify_artifact(Path(directory), trusted)
        self.add_verified(directory, manifest)
        return manifest

    def add_verified(self, directory: Path, manifest: Manifest) -> None:
        """Register an artifact the caller has just verified (``verify_artifact``)."""
        self.entries[manifest.artifact_id] = (Path(directory), manifest)

    def locate(self, artifact_id: str, rel: str) -> tuple[Path, str] | None:
        """The file and its sha256 for a request path, or None (unknown artifact, unlisted file)."""
        entry = self.entries.get(artifact_id)
        if entry is None:
            return None
        root, manifest = entry
        if rel == MANIFEST_NAME:
            return root / rel, artifact_id
        if rel == SIGNATURE_NAME:
            path = root / rel
            return (path, "") if path.is_file() else None
        listed = manifest.files.get(rel)
        return (root / rel, listed.sha256) if listed is not None else None


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` of a single-range header; None to send the whole file."""
    match = _RANGE.match(header or "")
    if match is None:
        return None  # absent, multi-range or another unit: the whole file is a valid answer
    start = int(match[1])
    end = min(int(match[2]) + 1, size) if match[2] else size
    if start >= size or start >= end:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end


def add_artifact_routes(app: web.Application, catalog: ArtifactCatalog) -> None:
    async def serve_file(request: web.Request) -> web.StreamResponse:
        artifact_id, rel = request.match_info["artifact_id"], request.match_info["path"]
        found = catalog.locate(artifact_id, rel) if _ID.match(artifact_id) else None
        if found is None:
            raise web.HTTPNotFound(text=f"no file {rel} in artifact {artifact_id}")
        path, sha256 = found
        etag = f'"{sha256}"' if sha256 else None
        size = path.stat().st_size
        wanted = _byte_range(request.headers.get("Range"), size)
        if wanted is not None and request.headers.get("If-Range") not in (None, etag):
            wanted = None  # the file changed since the client's partial copy: all of it again
        start, end = wanted or (0, size)
        response = web.StreamResponse(status=206 if wanted else 200)
        response.content_length = end - start
        response.content_type = "application/octet-stream"
        response.headers["Accept-Ranges"] = "bytes"
        if etag:
            response.headers["ETag"] = etag
        if wanted:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        await response.prepare(request)
        sent = 0
        try:
            with path.open("rb") as handle:
                handle.seek(start)
                while sent < end - start:
                    chunk = await asyncio.to_thread(handle.read, min(CHUNK, end - start - sent))
                    if not chunk:
                        break
                    await response.write(chunk)
                    sent += len(chunk)
        finally:
            catalog.served.append(Served(artifact_id, rel, start, sent))
        await response.write_eof()
        return response

    app.router.add_get("/artifacts/{artifact_id}/{path:.+}", serve_file)
