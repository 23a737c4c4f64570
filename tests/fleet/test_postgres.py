"""The throwaway PostgreSQL of the store tests: where it finds the server, what it says when it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from fleet.postgres import PostgresError, PostgresServer, find_postgres


def fake_installation(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True)
    for name in ("initdb", "postgres"):
        (bin_dir / name).touch(mode=0o755)
    return bin_dir


def test_the_newest_debian_version_is_chosen(tmp_path: Path) -> None:
    for version in ("9.6", "15", "13"):
        fake_installation(tmp_path / version / "bin")
    (tmp_path / "17" / "bin").mkdir(parents=True)  # postgresql-client only: no server binaries
    assert find_postgres(tmp_path) == tmp_path / "15" / "bin"


def test_a_missing_server_names_the_package_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PostgresError, match=r"apt-get install postgresql .*scripts/bootstrap.sh test"):
        find_postgres(tmp_path / "nothing")


def test_each_database_is_its_own(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database("test_own")
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x int)"))
            assert conn.execute(text("SELECT current_database()")).scalar_one() == "test_own"
    finally:
        engine.dispose()
    postgres_server.drop_database("test_own")
    with pytest.raises(ValueError, match="lower-case identifier"):
        postgres_server.create_database('x"; DROP DATABASE postgres; --')
