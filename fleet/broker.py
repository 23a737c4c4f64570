"""A Mosquitto broker run as a child process: for the tests and the local demo.

Torch-free. Writes a config into a working directory and runs ``mosquitto -c CONF`` in the foreground
(there is no init system on the machines we test on), owning its PID. Persistence is on, saved every
second, in a directory of its own, so that ``restart()`` (and ``kill()`` then ``start()``) exercise what a
real broker restart does to persistent sessions and retained messages. Optional: users in a password file,
an ACL file, and TLS with a self-signed CA made here (clients must be given ``ca_file`` explicitly).

Production sites run their own broker; this class is not how they configure it.
"""

from __future__ import annotations

import datetime
import ipaddress
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
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
# The test CA and server certificate live as long as a test run or a demo; a day is plenty.
CERT_VALIDITY = datetime.timedelta(days=1)
# Lines of the broker's log quoted in an error.
LOG_TAIL_LINES = 20


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
    """A throwaway CA and a server certificate signed by it, for ``hosts`` (DNS names or IP addresses)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    # Valid from a minute ago: the clocks of client and broker processes on one machine agree, but a
    # certificate valid "from now" can be refused by a check made within the same second.
    not_before, not_after = now - datetime.timedelta(minutes=1), now + CERT_VALIDITY
    # P-256: key generation takes milliseconds (RSA-2048 takes ~0.1 s) and every TLS stack accepts it.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zimage-edge test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key_file.chmod(0o600)
    return files


def write_password_file(path: Path, users: Mapping[str, str], binary: str = "mosquitto_passwd") -> Path:
    """A Mosquitto password file (PBKDF2-SHA512 hashes) made by ``mosquitto_passwd -b``."""
    tool = find_mosquitto(binary)
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in users.items():
        # -b takes the password on the command line: fine for test and demo users, not for real ones.
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True, timeout=30)
    return path


class MosquittoBroker:
    """One Mosquitto process on ``host`` and a free port, with its config, data and log under ``workdir``.

    ``users`` (name -> password) turns anonymous access off; ``acl`` is the text of an ACL file; ``tls``
    serves TLS only, with a CA written to ``workdir/tls/ca.crt`` (``ca_file``). ``extra_config`` lines are
    appended to the config as they are (e.g. ``max_queued_messages 5000``).
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
    ) -> None:
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
        self._process: subprocess.Popen[bytes] | None = None
        self._prepared = False
        self._served = False

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> MosquittoBroker:
        """Start the broker and return once its port accepts connections."""
        if self.running:
            return self
        if not self._prepared:
            self._prepare()
        for attempt in range(PORT_TRIES):
            if not self.port:
                self.port = free_port(self.host)
            self._write_config()
            try:
                self._launch()
            except BrokerError:
                # Only a port picked here and never served may change: clients of a restarted broker
                # reconnect to the port they know.
                movable = self._requested_port is None and not self._served
                if movable and attempt + 1 < PORT_TRIES and "Address already in use" in self.log_tail():
                    self.port = 0
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

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

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
        self._prepared = True

    def _write_config(self) -> None:
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
        weakref.finalize(self, _terminate, self._process)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerError(f"mosquitto exited with status {code} at start:\n{self.log_tail()}")
            if _accepts(self.host, self.port):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"mosquitto did not accept connections within {self.start_timeout_s} s:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


def _accepts(host: str, port: int) -> bool:
    """Whether a TCP connection to the port succeeds now (refused: not listening yet)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False
