"""The project's own errors: failures with a message meant for the user, reported in one line.

Torch-free. Command-line entry points catch ``ZimageEdgeError`` (and only it) and print its message;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ZimageEdgeError(Exception):
    """A failure the user can act on; the message says what and where."""


class UsageError(ZimageEdgeError):
    """Bad input from the command line: reported in one line, exit status 2."""


class GenerationCancelled(ZimageEdgeError):
    """Raised inside the denoising loop when the caller asked to stop."""

    def __init__(self, step: int, total: int, reason: str = "") -> None:
        super().__init__(f"cancelled after step {step} of {total}" + (f": {reason}" if reason else ""))
        self.step = step
        self.total = total
        self.reason = reason
