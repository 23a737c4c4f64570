"""Images answered by URL (OpenAI ``response_format=url``): kept in memory for a while, then dropped."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

# At most this many images are kept for URL answers; older ones go first.
MAX_IMAGES = 256


@dataclass
class ImageStore:
    ttl_s: float
    clock: Callable[[], float] = time.monotonic
    _items: OrderedDict[str, tuple[float, str, bytes]] = field(default_factory=OrderedDict)

    def put(self, data: bytes, mime: str) -> str:
        self._expire()
        image_id = secrets.token_urlsafe(16)
        self._items[image_id] = (self.clock() + self.ttl_s, mime, data)
        while len(self._items) > MAX_IMAGES:
            self._items.popitem(last=False)
        return image_id

    def get(self, image_id: str) -> tuple[str, bytes] | None:
        self._expire()
        item = self._items.get(image_id)
        return None if item is None else (item[1], item[2])

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, (expires, _, _) in self._items.items() if expires <= now]:
            del self._items[key]
