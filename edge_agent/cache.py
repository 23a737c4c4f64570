"""An LRU cache of generated results, bounded in bytes.

Only requests with an explicit seed are cacheable (without one, every call must draw anew). The key
is the loaded model's identity plus the normalised request, so a model swap never serves stale images.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

from edge_agent.jobs import JobOutput
from zimage_edge.request import GenerationRequest


def cache_key(model_id: str, request: GenerationRequest, output_format: str) -> str | None:
    if request.seed is None:
        return None
    normalised = json.dumps(
        {"model": model_id, "format": output_format, "request": request.model_dump(mode="json")}, sort_keys=True
    )
    return hashlib.sha256(normalised.encode()).hexdigest()


@dataclass
class ResultCache:
    max_bytes: int

    def __post_init__(self) -> None:
        self._items: OrderedDict[str, JobOutput] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def _size(output: JobOutput) -> int:
        return sum(len(image) for image in output.images)

    def get(self, key: str) -> JobOutput | None:
        output = self._items.get(key)
        if output is not None:
            self._items.move_to_end(key)
        return output

    def put(self, key: str, output: JobOutput) -> None:
        size = self._size(output)
        if size > self.max_bytes:
            return  # larger than the whole cache: caching it would only evict everything else
        if key in self._items:
            self.bytes -= self._size(self._items.pop(key))
        self._items[key] = output
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= self._size(evicted)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)
