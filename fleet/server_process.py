"""What the servers this package runs as child processes share (Mosquitto, a throwaway PostgreSQL):
use as a context manager, whether it runs, the tail of its log, and a stop that escalates to a kill."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

# Log lines quoted in an error when a server does not come up.
LOG_TAIL_LINES = 20


class ServerProcess:
    """A mixin: ``start`` and ``stop`` come from the server's class, which sets ``_process``."""

    _process: subprocess.Popen[bytes] | None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _log_path(self) -> Path | None:
        """The server's log file (None: it has none now, e.g. its directory was removed)."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        path = self._log_path()
        if path is None:
            return ""
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def terminate(process: subprocess.Popen[bytes], timeout_s: float, signum: int = signal.SIGTERM) -> None:
    """Ask the process to stop with ``signum``; kill it if it has not within ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)
