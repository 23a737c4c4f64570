"""Who may use the controller's REST API: bearer tokens with a role. Torch-free.

Tokens are configured by their sha256 (``zimage-edge hash-key`` prints it), never in clear, except the
one plain ``api_token`` a small site may set for a single operator. A presented token is hashed and
compared with every configured hash in constant time (``hmac.compare_digest``, no early exit), so the
time of a refusal says nothing about which token came close.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Role(StrEnum):
    READ = "read"  # every GET: nodes, releases, rollouts, metrics, the status page's data
    OPERATOR = "operator"  # and every change: publish, rollout create/pause/resume/abort


class ApiToken(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="who holds the token")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the token; never the token itself")
    role: Role = Field(default=Role.READ, description="read (GET only) or operator (may change things)")

    @staticmethod
    def hash(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    @classmethod
    def of(cls, name: str, token: str, role: Role) -> ApiToken:
        """A token configured from its clear text (tests, the plain ``api_token`` setting)."""
        return cls(name=name, sha256=cls.hash(token), role=role)


class TokenBook:
    """The configured tokens; ``holder`` says whose a presented token is, or None."""

    def __init__(self, tokens: Sequence[ApiToken]) -> None:
        if not tokens:
            raise ValueError("the controller's API needs at least one token")
        names = [token.name for token in tokens]
        if len(set(names)) != len(names):
            raise ValueError(f"token names must be unique: {sorted(names)}")
        self._tokens = tuple(tokens)

    def holder(self, presented: str) -> ApiToken | None:
        digest = ApiToken.hash(presented).encode()
        found = None
        for token in self._tokens:  # every one, always: no early exit
            if hmac.compare_digest(digest, token.sha256.encode()):
                found = token
        return found
