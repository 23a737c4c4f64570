"""A throwaway PostgreSQL server run as a child process: for the tests of the store on a real server.

Torch-free. ``initdb`` makes a cluster in a fresh directory and ``postgres`` runs in the foreground on a
free loopback port with its Unix socket in that directory, owning its PID the way ``fleet.broker`` owns
Mosquitto (there is no init system on the machines we test on). PostgreSQL refuses to run as root, so a
root caller (a CI container) makes and runs the cluster as the ``postgres`` system user that the Debian
package creates. Durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``): the data
dies with the test session, and a test should not wait on a disk flush it does not test.

Production sites run their own server; this class is not how they configure it.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from fleet.broker import free_port
from fleet.server_process import ServerProcess, terminate
from zimage_edge.errors import ZimageEdgeError

# Where Debian/Ubuntu's ``postgresql-<ver>`` packages put the server binaries, one directory per version
# (they are not on PATH: only the version-independent wrappers of ``postgresql-common`` are).
DEBIAN_ROOT = Path("/usr/lib/postgresql")
# What a directory must hold to be a usable server installation.
BINARIES = ("initdb", "postgres")
# The system user PostgreSQL runs as when the caller is root (the Debian package creates it).
SYSTEM_USER = "postgres"
# A new cluster answers ~0.9 s after initdb starts here (notes/infra.md); 30 s bounds a hang on a loaded
# shared machine without failing it.
START_TIMEOUT_S = 30.0
# Fast shutdown (SIGINT) rolls back open transactions and closes connections: well under a second.
STOP_TIMEOUT_S = 10.0
# How often start() looks at postmaster.pid: a few ms is noise next to the server's own start-up.
POLL_INTERVAL_S = 0.01
# A free port is found by binding port 0 and closing it; another process may take it before PostgreSQL
# binds it. Three tries make that race irrelevant in practice (as for Mosquitto).
PORT_TRIES = 3
# postmaster.pid's eighth line is the server's status; pg_ctl -w waits for this same word.
PID_FILE_STATUS_LINE = 7
# Database names made by create_database: plain identifiers, so that quoting them is never in question.
_DATABASE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresError(ZimageEdgeError):
    """The server is missing, or did not start or stop; the message quotes its log."""


def install_hint() -> str:
    return "apt-get install postgresql (Debian/Ubuntu), or scripts/bootstrap.sh test"


def find_postgres(root: Path = DEBIAN_ROOT) -> Path:
    """The directory of ``initdb`` and ``postgres``: the newest under ``root`` (Debian), else on PATH."""
    versions = [path for path in root.glob("*/bin") if all((path / name).is_file() for name in BINARIES)]
    if versions:
        return max(versions, key=lambda path: _version_key(path.parent.name))
    found = shutil.which("initdb")
    if found is not None and (Path(found).parent / "postgres").is_file():
        return Path(found).parent
    raise PostgresError(f"PostgreSQL server binaries (initdb, postgres) not found under {root}: {install_hint()}")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


class PostgresServer(ServerProcess):
    """One PostgreSQL cluster in ``workdir`` (a fresh temporary directory, removed on stop, when None).

    ``user`` is the cluster's superuser, trusted without a password on loopback. ``url(database)`` is
    the SQLAlchemy URL of a database; ``create_database`` makes one, e.g. one per test.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        user: str = "fleet",
        host: str = "127.0.0.1",
        port: int | None = None,
        bin_dir: Path | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.bin_dir = bin_dir or find_postgres()
        self._owned_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.user = user
        self.host = host
        self._requested_port = port
        self.port = port or 0
        self.start_timeout_s = start_timeout_s
        self.settings = dict(settings or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._admin: Engine | None = None  # on the ``postgres`` database, for CREATE/DROP DATABASE

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._dir / "data"

    @property
    def log_file(self) -> Path:
        return self._dir / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs (its backends are its children)."""
        return self._process.pid if self.running and self._process is not None else None

    def start(self) -> PostgresServer:
        """Make the cluster (once) and return when the server accepts connections."""
        if self.running:
            return self
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(PORT_TRIES):
            if not self.port:
                self.port = free_port(self.host)
            try:
                self._launch()
            except PostgresError:
                movable = self._requested_port is None
                if movable and attempt + 1 < PORT_TRIES and "could not bind" in self.log_tail():
                    self.port = 0
                    continue
                raise
            break
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Fast shutdown (SIGINT: open transactions rolled back, clients disconnected) and wait."""
        if self._admin is not None:
            self._admin.dispose()
            self._admin = None
        process, self._process = self._process, None
        if process is not None:
            terminate(process, timeout_s, signal.SIGINT)
        if self._owned_dir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _log_path(self) -> Path | None:
        return None if self.workdir is None else self.log_file  # never started, or stopped and removed

    # -- databases --------------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL (psycopg 3) of ``database`` on this server."""
        return URL.create(
            "postgresql+psycopg", username=self.user, host=self.host, port=self.port, database=database
        ).render_as_string(hide_password=False)

    def create_database(self, name: str) -> str:
        """Create an empty database (a plain lower-case identifier) and return its URL."""
        self._execute(f'CREATE DATABASE "{_checked(name)}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop the database, closing connections still open to it (a store a test did not close)."""
        self._execute(f'DROP DATABASE IF EXISTS "{_checked(name)}" WITH (FORCE)')

    def _execute(self, statement: str) -> None:
        if not self.running:
            raise PostgresError("the PostgreSQL server is not running")
        if self._admin is None:
            # CREATE/DROP DATABASE cannot run inside a transaction block.
            self._admin = create_engine(self.url(), poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with self._admin.connect() as conn:
            conn.execute(text(statement))

    # -- internals --------------------------------------------------------------------------------

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            # Not under pytest's tmp_path: that is private to the caller, and the server may run as
            # another user, who must reach its directory.
            self.workdir = Path(tempfile.mkdtemp(prefix="zimage-edge-pg-"))
            weakref.finalize(self, shutil.rmtree, self.workdir, ignore_errors=True)
        return self.workdir

    def _run_as(self) -> dict[str, Any]:
        """Popen arguments that drop root for the server's own user; nothing when not root."""
        if os.geteuid() != 0:
            return {}
        try:
            account = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise PostgresError(
                f"PostgreSQL refuses to run as root and there is no {SYSTEM_USER!r} user: {install_hint()}"
            ) from None
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        run_as = self._run_as()
        self._dir.mkdir(parents=True, exist_ok=True)
        if run_as:
            os.chown(self._dir, run_as["user"], run_as["group"])
        # C locale: the same sort order on every machine (and no dependence on the locales installed);
        # --no-sync: the cluster is thrown away, like everything else written with fsync off.
        command = [
            str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", self.user,
            "-E", "UTF8", "--locale=C", "--no-sync",
        ]  # fmt: skip
        result = subprocess.run(
            command, capture_output=True, check=False, timeout=self.start_timeout_s, cwd=self._dir, **run_as
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise PostgresError(f"initdb exited with status {result.returncode}:\n{output}")

    def _command(self) -> Sequence[str]:
        settings = {
            "listen_addresses": self.host,
            "unix_socket_directories": str(self._dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **self.settings,
        }
        options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        server = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        return [*die_with_parent(), *server, *options]

    def _launch(self) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        with self.log_file.open("ab") as log:
            log.write(f"--- start on port {self.port}\n".encode())
            log.flush()
            # Its own session: a Ctrl-C meant for the test runner does not reach the server before the
            # fixture stops it in order.
            process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self._dir,
                start_new_session=True,
                **self._run_as(),
            )
        self._process = process
        # If the owner exits without stop(), this ends the server at interpreter exit or collection.
        weakref.finalize(self, terminate, process, STOP_TIMEOUT_S, signal.SIGINT)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if process.poll() is not None:
                self._process = None
                raise PostgresError(f"postgres exited with status {process.returncode} at start:\n{self.log_tail()}")
            if _status(pid_file) == "ready":
                return
            if time.monotonic() > deadline:
                self._process = None
                terminate(process, STOP_TIMEOUT_S, signal.SIGINT)
                raise PostgresError(
                    f"postgres did not accept connections within {self.start_timeout_s} s:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)


def die_with_parent(signal_name: str = "INT") -> list[str]:
    """A prefix for a child's command: util-linux ``setpriv`` asks the kernel for ``signal_name`` (SIGINT:
    PostgreSQL's fast shutdown) when the thread that started the child exits, then runs the child in its
    place. A test runner or a demo that is killed or crashes runs no finalizer; without this, its servers
    would run on. Nothing where ``setpriv`` is missing (not Linux): there, only an orderly stop ends them."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", signal_name, "--"] if setpriv is not None else []


def _checked(name: str) -> str:
    if not _DATABASE_NAME.match(name):
        raise ValueError(f"database name {name!r} must be a lower-case identifier of at most 63 characters")
    return name


def _status(pid_file: Path) -> str | None:
    """The server's status word in postmaster.pid ("starting", "ready", ...), None before it is written."""
    try:
        lines = pid_file.read_text().splitlines()
    except FileNotFoundError:
        return None
    return lines[PID_FILE_STATUS_LINE].strip() if len(lines) > PID_FILE_STATUS_LINE else None
