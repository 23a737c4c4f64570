"""A Mosquitto broker run as a child process: for the tests and the local demo.

Torch-free. Writes a config into a working directory and runs ``mosquitto -c CONF`` in the foreground
(there is no init system on the machines we test on), owning its PID. Persistence is on, saved every
second, in a directory of its own, so that ``restart()`` (and ``kill()`` then ``start()``) exercise what a
real broker restart does to persistent sessions and retained messages. Optional: users in a password file,
an ACL file, and TLS with a self-signed CA made here (clients must be given ``ca_file`` explicitly).

Production sites run their own broker; the ``users``/``acl``/``tls`` options are not how they configure
it. With ``pki`` (a directory made by ``fleet.security.init_pki``) the broker runs from the config
``fleet.security.write_broker_config`` writes, exactly what an operator deploys, on free loopback ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.security import BrokerLimits, BrokerSettings, PkiPaths, init_pki, write_broker_config
from fleet.server_process import ServerProcess, terminate
from zimage_edge.errors import ZimageEdgeError

# Mosquitto accepts connections ~15 ms after start on an empty database (notes/infra.md); a database of
# queued sessions takes longer to load. 10 s bounds a hang without failing a loaded shared machine.
START_TIMEOUT_S = 10.0
# SIGTERM makes Mosquitto save its database and exit, well under a second here; after this, SIGKILL.
STOP_TIMEOUT_S = 10.0
# How often start() tries the port: a few ms is noise next to the broker's own start-up.
POLL_INTERVAL_S = 0.005
# A free port is found by binding port 0 and closing it; another process may take it before Mosquitto
# binds it. Three tries make that race irrelevant in practice.
PORT_TRIES = 3
# Mosquitto re-reads its password, ACL and CRL files on SIGHUP; one that has not logged the reload after
# this long is asked again (a reload takes milliseconds; a lost signal would otherwise cost the timeout).
SIGNAL_RELOAD = signal.SIGHUP
RELOAD_RESIGNAL_S = 0.5
# What Mosquitto (2.0.11, log_type information) logs when a SIGHUP makes it reload.
RELOAD_LOG_LINE = "Reloading config."


class BrokerError(ZimageEdgeError):
    """The broker did not start or stop; the message quotes its log."""


def install_hint() -> str:
    return "apt-get install mosquitto mosquitto-clients (Debian/Ubuntu), or scripts/bootstrap.sh test"


def find_mosquitto(binary: str = "mosquitto") -> str:
    """The path of the mosquitto binary (it lives in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BrokerError(f"{binary} not found: {install_hint()}")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now (see PORT_TRIES for the race this leaves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path  # give this to clients
    cert_file: Path
    key_file: Path


def write_self_signed_tls(directory: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1")) -> TlsFiles:
    """A throwaway CA and a server certificate signed by it, for ``hosts`` (DNS names or IP addresses):
    ``fleet.security.init_pki`` in a directory of its own (replaced if it exists)."""
    paths = init_pki(directory, hosts, force=True)
    return TlsFiles(ca_file=paths.ca_cert, cert_file=paths.server_cert, key_file=paths.server_key)


def write_password_file(path: Path, users: Mapping[str, str], binary: str = "mosquitto_passwd") -> Path:
    """A Mosquitto password file (PBKDF2-SHA512 hashes) made by ``mosquitto_passwd -b``."""
    tool = find_mosquitto(binary)
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in users.items():
        # -b takes the password on the command line: fine for test and demo users, not for real ones.
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True, timeout=30)
    return path


class MosquittoBroker(ServerProcess):
    """One Mosquitto process on ``host`` and a free port, with its config, data and log under ``workdir``.

    ``users`` (name -> password) turns anonymous access off; ``acl`` is the text of an ACL file; ``tls``
    serves TLS only, with a CA written to ``workdir/tls/ca.crt`` (``ca_file``). ``extra_config`` lines are
    appended to the config as they are (e.g. ``max_queued_messages 5000``).

    ``pki`` (exclusive with ``users``, ``acl`` and ``tls``) runs the deployable config of that PKI
    directory: a password listener on ``port`` and a client-certificate listener on ``certificate_port``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        tls: bool = False,
        extra_config: Sequence[str] = (),
        binary: str = "mosquitto",
        start_timeout_s: float = START_TIMEOUT_S,
        pki: Path | None = None,
        certificate_port: int | None = None,
        limits: BrokerLimits | None = None,
    ) -> None:
        if pki is not None and (users or acl is not None or tls):
            raise ValueError("pki brings its own users, ACL and TLS: do not pass users, acl or tls with it")
        self.workdir = Path(workdir)
        self.host = host
        self._requested_port = port
        self.port = port or 0
        self.users = dict(users or {})
        self.acl = acl
        self.tls = tls
        self.extra_config = list(extra_config)
        self.binary = find_mosquitto(binary)
        self.start_timeout_s = start_timeout_s
        self.data_dir = self.workdir / "data"
        self.config_file = self.workdir / "mosquitto.conf"
        self.log_file = self.workdir / "mosquitto.log"
        self.ca_file: Path | None = None
        self.pki = Path(pki) if pki is not None else None
        self._requested_certificate_port = certificate_port
        self.certificate_port = certificate_port or 0
        self.limits = limits or BrokerLimits.for_fleet()
        self._process: subprocess.Popen[bytes] | None = None
        self._prepared = False
        self._served = False

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> MosquittoBroker:
        """Start the broker and return once its port accepts connections."""
        if self.running:
            return self
        if not self._prepared:
            self._prepare()
        for attempt in range(PORT_TRIES):
            if not self.port:
                self.port = free_port(self.host)
            if self.pki is not None and not self.certificate_port:
                self.certificate_port = free_port(self.host)
            self._write_config()
            try:
                self._launch()
            except BrokerError:
                # Only a port picked here and never served may change: clients of a restarted broker
                # reconnect to the port they know.
                movable = self._requested_port is None and self._requested_certificate_port is None and not self._served
                if movable and attempt + 1 < PORT_TRIES and "Address already in use" in self.log_tail():
                    self.port = self.certificate_port = 0
                    continue
                raise
            self._served = True
            break
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (the broker saves its database) and wait; SIGKILL if it does not exit in time."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
                self._process = None
                raise BrokerError(f"mosquitto (pid {process.pid}) ignored SIGTERM for {timeout_s} s; killed") from None
        self._process = None

    def kill(self) -> None:
        """SIGKILL: a crash. What was saved (every ``autosave_interval``) survives; the rest is lost."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(STOP_TIMEOUT_S)
        self._process = None

    def restart(self) -> MosquittoBroker:
        """Stop and start again on the same port with the same persistence directory."""
        self.stop()
        return self.start()

    def reload(self) -> None:
        """SIGHUP, and return once the broker has logged that it reloads. Mosquitto 2.0.11 then re-reads its
        password, ACL and CRL files, drops connected clients whose password no longer matches and applies
        the new ACL to the others. It logs first and reloads in the same turn of its one-threaded loop, so
        any connection made after this returns meets the new files."""
        process = self._process
        if process is None or process.poll() is not None:
            raise BrokerError("mosquitto is not running")
        before = self._log_count(RELOAD_LOG_LINE)
        process.send_signal(SIGNAL_RELOAD)
        start = time.monotonic()
        deadline, signalled = start + self.start_timeout_s, start
        while self._log_count(RELOAD_LOG_LINE) <= before:
            now = time.monotonic()
            if process.poll() is not None or now > deadline:
                raise BrokerError(f"mosquitto did not reload within {self.start_timeout_s} s:\n{self.log_tail()}")
            if now - signalled >= RELOAD_RESIGNAL_S:
                # Two SIGHUPs close together can make one reload (a pending signal is a flag): ask again.
                process.send_signal(SIGNAL_RELOAD)
                signalled = now
            time.sleep(POLL_INTERVAL_S)

    def _log_count(self, text: str) -> int:
        try:
            return self.log_file.read_text(errors="replace").count(text)
        except FileNotFoundError:
            return 0

    def _log_path(self) -> Path:
        return self.log_file

    # -- internals --------------------------------------------------------------------------------

    def _prepare(self) -> None:
        # One fresh persistence directory per instance: sessions left by other runs would otherwise be
        # loaded and keep queueing messages (notes/infra.md).
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir()
        if self.users:
            write_password_file(self.workdir / "passwd", self.users)
        if self.acl is not None:
            (self.workdir / "acl").write_text(self.acl)
        if self.tls:
            self.ca_file = write_self_signed_tls(self.workdir / "tls").ca_file
        if self.pki is not None:
            self.ca_file = PkiPaths(self.pki).ca_cert
        self._prepared = True

    def _write_config(self) -> None:
        if self.pki is not None:
            settings = BrokerSettings(
                data_dir=self.data_dir,
                bind=self.host,
                port=self.port,
                certificate_port=self.certificate_port,
                limits=self.limits,
                # Started as root, Mosquitto would switch to user "mosquitto", who cannot read the workdir.
                run_as="root" if os.geteuid() == 0 else None,
            )
            write_broker_config(self.pki, self.config_file, settings)
            if self.extra_config:
                with self.config_file.open("a") as config:
                    config.write("\n".join(self.extra_config) + "\n")
            return
        lines = [
            f"listener {self.port} {self.host}",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            # Save every second (default 1800 s) so that a kill loses at most a second of queued messages.
            "autosave_interval 1",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"allow_anonymous {'false' if self.users else 'true'}",
        ]
        if os.geteuid() == 0:
            # Started as root, Mosquitto switches to user "mosquitto" before it opens its files, which
            # live in a directory that user cannot write (notes/infra.md).
            lines.append("user root")
        if self.tls:
            tls_dir = self.workdir / "tls"
            lines += [
                f"cafile {tls_dir / 'ca.crt'}",
                f"certfile {tls_dir / 'server.crt'}",
                f"keyfile {tls_dir / 'server.key'}",
            ]
        if self.users:
            lines.append(f"password_file {self.workdir / 'passwd'}")
        if self.acl is not None:
            lines.append(f"acl_file {self.workdir / 'acl'}")
        lines += self.extra_config
        self.config_file.write_text("\n".join(lines) + "\n")

    def _launch(self) -> None:
        with self.log_file.open("ab") as log:
            log.write(f"--- start on port {self.port}\n".encode())
            log.flush()
            # Its own session: a Ctrl-C meant for the test runner does not reach the broker before the
            # fixture stops it in order.
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        # Its own session also shields it from the owner's death: if the owner exits without stop()
        # (an uncaught exception, a script), this ends the broker at interpreter exit or collection.
        weakref.finalize(self, terminate, self._process, STOP_TIMEOUT_S)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerError(f"mosquitto exited with status {code} at start:\n{self.log_tail()}")
            if _accepts(self.host, self.port) and (
                not self.certificate_port or _accepts(self.host, self.certificate_port)
            ):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"mosquitto did not accept connections within {self.start_timeout_s} s:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)


def _accepts(host: str, port: int) -> bool:
    """Whether a TCP connection to the port succeeds now (refused: not listening yet)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False
