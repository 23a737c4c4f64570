"""Artifact distribution over real HTTP on loopback: verified installs, resumed downloads, refusals."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from fleet.artifact_server import ArtifactCatalog, add_artifact_routes
from fleet.model_store import DownloadError, ModelStore, artifact_url
from quantize.manifest import read_manifest

WAIT_S = 60


@pytest.fixture
def source(tiny_model_dir: Path, artifacts, signing_keys, tmp_path: Path) -> Path:
    private, _public, _path = signing_keys
    return Path(shutil.copytree(artifacts.get(tiny_model_dir, "int8", sign_key=private), tmp_path / "served"))


@pytest.fixture
async def served(aiohttp_server, source: Path, signing_keys):
    _private, public, _path = signing_keys
    catalog = ArtifactCatalog()
    manifest = catalog.add(source, [public])
    app = web.Application()
    add_artifact_routes(app, catalog)
    server = await aiohttp_server(app)
    return catalog, manifest, artifact_url(str(server.make_url("")), manifest.artifact_id)


def _biggest(source: Path) -> str:
    manifest, _raw = read_manifest(source)
    return max(manifest.files, key=lambda rel: manifest.files[rel].size)


async def test_an_artifact_is_fetched_verified_and_installed_once(served, signing_keys, tmp_path: Path) -> None:
    catalog, manifest, base = served
    _private, public, _path = signing_keys
    store = ModelStore(tmp_path / "store", margin_bytes=0)
    seen: list[tuple[int, int]] = []
    async with aiohttp.ClientSession() as session:
        path = await store.fetch(
            session, base, manifest.artifact_id, trusted=[public], on_progress=lambda d, t: seen.append((d, t))
        )
        assert path == store.path(manifest.artifact_id)
        assert store.installed() == [manifest.artifact_id]
        assert seen[-1] == (manifest.weight_bytes, manifest.weight_bytes)
        requests = len(catalog.served)
        assert await store.fetch(session, base, manifest.artifact_id, trusted=[public]) == path
        assert len(catalog.served) == requests  # already installed: nothing fetched again
    assert not store.partial(manifest.artifact_id).exists()


async def test_a_cut_download_resumes_where_it_stopped(served, source: Path, tmp_path: Path) -> None:
    catalog, manifest, base = served
    store = ModelStore(tmp_path / "store", margin_bytes=0)
    big = _biggest(source)
    partial_file = store.partial(manifest.artifact_id) / big
    async with aiohttp.ClientSession() as session:
        # A slow link (256 KiB/s) cut by the test once part of the biggest file is on disk.
        first = asyncio.create_task(store.fetch(session, base, manifest.artifact_id, bytes_per_s=256 * 1024))
        deadline = time.monotonic() + WAIT_S
        while not (partial_file.is_file() and partial_file.stat().st_size >= 64 * 1024):
            assert time.monotonic() < deadline, "the download never started"
            assert not first.done(), first
            await asyncio.to_thread(lambda: None)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        kept = partial_file.stat().st_size
        assert 0 < kept < manifest.files[big].size
        done_before = {s.path for s in catalog.served if s.path != big and s.start == 0}
        catalog.served.clear()
        await store.fetch(session, base, manifest.artifact_id)
    assert store.has(manifest.artifact_id)
    resumed = [s for s in catalog.served if s.path == big]
    assert [(s.start, s.sent) for s in resumed] == [(kept, manifest.files[big].size - kept)]
    refetched = {s.path for s in catalog.served} & done_before
    assert refetched <= {"manifest.json"}  # complete files were not fetched again


async def test_a_tampered_artifact_is_refused_and_nothing_installed(served, source: Path, tmp_path: Path) -> None:
    _catalog, manifest, base = served
    victim = source / _biggest(source)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # altered on the server after it was registered
    victim.write_bytes(bytes(data))
    store = ModelStore(tmp_path / "store", margin_bytes=0)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(DownloadError, match="does not match its sha256") as info:
            await store.fetch(session, base, manifest.artifact_id)
    assert info.value.reason == "hash"
    assert store.installed() == []
    assert not store.path(manifest.artifact_id).exists()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real small disk: a 1 MiB tmpfs (the tests run as root), smaller than the 1.9 MB artifact."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


async def test_a_full_disk_is_refused_before_downloading(served, small_disk: Path) -> None:
    catalog, manifest, base = served
    store = ModelStore(small_disk / "store", margin_bytes=0)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(DownloadError, match="not enough disk") as info:
            await store.fetch(session, base, manifest.artifact_id)
    assert info.value.reason == "disk"
    assert [s.path for s in catalog.served] == ["manifest.json"]  # no weight was downloaded
    assert list((small_disk / "store").iterdir()) == []


async def test_ranges_etags_and_unlisted_files(served, source: Path) -> None:
    _catalog, manifest, base = served
    rel = _biggest(source)
    entry = manifest.files[rel]
    url = base
    root = base.rsplit("/artifacts/", 1)[0]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/{rel}", headers={"Range": "bytes=10-19"}) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 10-19/{entry.size}"
            assert response.headers["ETag"] == f'"{entry.sha256}"'
            assert await response.read() == (source / rel).read_bytes()[10:20]
        stale = {"Range": "bytes=10-", "If-Range": '"0000"'}
        async with session.get(f"{url}/{rel}", headers=stale) as response:
            assert response.status == 200  # another version of the file: all of it
            assert len(await response.read()) == entry.size
        async with session.get(f"{url}/{rel}", headers={"Range": f"bytes={entry.size}-"}) as response:
            assert response.status == 416
        async with session.get(f"{url}/manifest.json") as response:
            assert response.headers["ETag"] == f'"{manifest.artifact_id}"'
        (source / "stray.bin").write_bytes(b"x")
        for path in ("stray.bin", "../served/manifest.json", "transformer/../../x"):
            async with session.get(f"{url}/{path}") as response:
                assert response.status == 404, path
        async with session.get(f"{root}/artifacts/{'0' * 64}/manifest.json") as response:
            assert response.status == 404


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", margin_bytes=0)
    ids = [f"{i:064x}" for i in range(4)]
    for n, artifact_id in enumerate(ids):
        (store.path(artifact_id)).mkdir()
        (store.path(artifact_id) / "manifest.json").write_text("{}")
        stamp = 1_000_000_000 + n
        os.utime(store.path(artifact_id), (stamp, stamp))
    assert store.installed() == ids
    assert store.prune(keep_last=2, protect={ids[0]}) == [ids[1]]
    assert store.installed() == [ids[0], ids[2], ids[3]]
