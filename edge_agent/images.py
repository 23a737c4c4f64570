"""Images answered by URL (OpenAI ``response_format=url``): kept in memory for a while, then dropped.

Each image belongs to the API key that asked for it; another key cannot tell it exists.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.settings import AgentSettings

# At most this many images are kept for URL answers, whatever their size; older ones go first.
MAX_IMAGES = 256
DEFAULT_MAX_BYTES: int = AgentSettings.model_fields["image_store_max_bytes"].default


@dataclass(frozen=True)
class StoredImage:
    owner: str
    mime: str
    data: bytes
    expires: float


@dataclass
class ImageStore:
    ttl_s: float
    max_bytes: int = DEFAULT_MAX_BYTES
    clock: Callable[[], float] = time.monotonic
    _items: OrderedDict[str, StoredImage] = field(default_factory=OrderedDict, init=False)
    _bytes: int = field(default=0, init=False)

    def put(self, data: bytes, mime: str, owner: str) -> str:
        """Keep ``data`` for ``owner``; the oldest images go when over the count or byte bound."""
        self._expire()
        image_id = secrets.token_urlsafe(16)
        self._items[image_id] = StoredImage(owner, mime, data, self.clock() + self.ttl_s)
        self._bytes += len(data)
        # The newest image stays even alone over the bound; the settings' floor keeps that from happening.
        while len(self._items) > 1 and (len(self._items) > MAX_IMAGES or self._bytes > self.max_bytes):
            self._drop(next(iter(self._items)))
        return image_id

    def get(self, image_id: str, *, reader: str, admin: bool = False) -> StoredImage | None:
        """The image if it is still kept and ``reader`` owns it (an admin reads any); else None."""
        self._expire()
        item = self._items.get(image_id)
        if item is None or not (admin or item.owner == reader):
            return None
        return item

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, image_id: str) -> None:
        self._bytes -= len(self._items.pop(image_id).data)

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, item in self._items.items() if item.expires <= now]:
            self._drop(key)


def public_base_url(settings: AgentSettings, sockname: Any = None) -> str:
    """Where clients reach the agent, for links: ``public_url``, else the address a connection reached.

    ``sockname`` is the local address of the client's connection (the bound address and port, the
    real ones even for port 0 or a wildcard bind); never anything the client sent.
    """
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host, port = (sockname[0], sockname[1]) if sockname else (settings.host, settings.port)
    return f"http://[{host}]:{port}" if _is_ipv6(host) else f"http://{host}:{port}"


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:  # a host name
        return False
