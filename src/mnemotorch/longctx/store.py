"""Where events live: host-memory KV blocks, a bounded device cache, and two-stage retrieval.

Each layer of each sequence owns one :class:`EventStore`. The keys and values of an event are
written once to *storage* (host memory, pinned when the model runs on CUDA, so copies can be
asynchronous); the attention reads them through a least-recently-used cache on the compute
device that never holds more than ``cache_tokens`` tokens, so device memory stays bounded
however long the context grows. The small per-event retrieval keys stay on the device.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EventStore", "select_events"]


@dataclass
class CacheStats:
    """Counters of one store's device cache (for tests and the memory report)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    peak_tokens: int = 0


class EventStore:
    """Events of one layer: ``(start, end)`` ranges, their KV in storage, retrieval keys on device.

    Args:
        device: the compute device (where attention runs).
        storage: where the KV of events is kept; ``None`` = host memory (``"cpu"``).
        cache_tokens: device cache capacity in tokens (``None``: unbounded). Only used when
            offloading; when storage and device are the same, events are read in place.
        offload: ``None`` (offload when ``storage != device``), or force it on/off.
    """

    def __init__(self, device: torch.device, storage: torch.device | str | None = None, cache_tokens: int | None = None,
                 offload: bool | None = None) -> None:
        self.device = torch.device(device)
        self.storage = torch.device(storage) if storage is not None else torch.device("cpu")
        # offload=None: go through the cache exactly when storage is another device; True forces the
        # cache path even on one device (how the CPU tests exercise the LRU policy).
        self.offload = (self.storage != self.device) if offload is None else bool(offload)
        self.pin = self.offload and self.device.type == "cuda" and self.storage.type == "cpu"
        self.cache_tokens = cache_tokens if self.offload else None
        self.ranges: list[tuple[int, int]] = []
        self.keys: list[Tensor] = []  # [H_kv, n, D] each, in storage
        self.values: list[Tensor] = []
        self.repr_keys: Tensor | None = None  # [E, H_kv, D] on device
        self._cache: OrderedDict[int, tuple[Tensor, Tensor]] = OrderedDict()
        self._cached = 0
        self.stats = CacheStats()
        self._stream = torch.cuda.Stream(self.device) if self.pin else None

    def __len__(self) -> int:
        return len(self.ranges)

    @property
    def sizes(self) -> list[int]:
        return [b - a for a, b in self.ranges]

    def add(self, start: int, end: int, k: Tensor, v: Tensor, repr_key: Tensor) -> None:
        """Append the event ``[start, end)``: ``k, v [H_kv, end-start, D]``, ``repr_key [H_kv, D]``."""
        if self.ranges and start < self.ranges[-1][1]:
            raise AssertionError(f"events must be added in temporal order: {start} < {self.ranges[-1][1]}")
        if self.offload:
            k = k.to(self.storage).contiguous()
            v = v.to(self.storage).contiguous()
            if self.pin:
                k, v = k.pin_memory(), v.pin_memory()
        self.ranges.append((start, end))
        self.keys.append(k)
        self.values.append(v)
        rk = repr_key[None].to(self.device)
        self.repr_keys = rk if self.repr_keys is None else torch.cat([self.repr_keys, rk])

    def fetch(self, ids: Sequence[int]) -> tuple[Tensor, Tensor]:
        """KV of the events ``ids`` (in the given order) on the device: ``[H_kv, sum of sizes, D]``."""
        if not ids:
            raise ValueError("fetch needs at least one event id")
        if not self.offload:
            return torch.cat([self.keys[i] for i in ids], 1), torch.cat([self.values[i] for i in ids], 1)
        needed = set(ids)
        ks, vs = [], []
        for i in ids:
            if i in self._cache:
                self._cache.move_to_end(i)
                self.stats.hits += 1
            else:
                self.stats.misses += 1
                self._cache[i] = self._load(i)
                self._cached += self.ranges[i][1] - self.ranges[i][0]
                self._evict(needed)
            k, v = self._cache[i]
            ks.append(k)
            vs.append(v)
        self.stats.peak_tokens = max(self.stats.peak_tokens, self._cached)
        if self._stream is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self._stream)
            # Blocks allocated on the side stream are read on the main one: tell the allocator, so an
            # evicted block is not reused by the next load before the main stream has read it.
            for t in ks + vs:
                t.record_stream(main)
        return torch.cat(ks, 1), torch.cat(vs, 1)

    def _load(self, i: int) -> tuple[Tensor, Tensor]:
        if self._stream is None:
            return self.keys[i].to(self.device), self.values[i].to(self.device)
        # Pinned host memory: the copy runs on a side stream and overlaps compute already queued.
        with torch.cuda.stream(self._stream):
            return self.keys[i].to(self.device, non_blocking=True), self.values[i].to(self.device, non_blocking=True)

    def _evict(self, keep: set[int]) -> None:
        if self.cache_tokens is None:
            return
        for j in list(self._cache):
            if self._cached <= self.cache_tokens:
                break
            if j in keep:
                continue
            del self._cache[j]
            self._cached -= self.ranges[j][1] - self.ranges[j][0]
            self.stats.evictions += 1

    @property
    def cached_tokens(self) -> int:
        return self._cached


def select_events(
    scores: Tensor,
    sizes: Sequence[int],
    similarity_budget: int,
    contiguity: deque[int] | None,
    contiguity_budget: int,
) -> list[int]:
    """EM-LLM's two-stage retrieval: the events to attend to, in temporal order.

    1. *Similarity buffer*: events in decreasing ``scores`` order are taken whole while they fit
       in ``similarity_budget`` tokens (an event that does not fit is skipped, smaller ones may
       still fit).
    2. *Contiguity buffer*: the temporal neighbours (``±1``) of the similarity hits, best hit
       first, are pushed into the queue ``contiguity`` that persists across steps; the oldest
       entries are dropped while the queue holds more than ``contiguity_budget`` tokens.

    The result is the union, sorted by event index (= by time). ``contiguity`` is updated in place.
    """
    n = len(sizes)
    order = torch.argsort(scores.float(), descending=True, stable=True).tolist() if n else []
    hits: list[int] = []
    used = 0
    for i in order:
        if used + sizes[i] <= similarity_budget:
            hits.append(i)
            used += sizes[i]
    chosen = set(hits)
    if contiguity is not None and contiguity_budget > 0:
        for i in hits:
            for j in (i - 1, i + 1):
                if 0 <= j < n and j not in chosen and sizes[j] <= contiguity_budget:
                    if j in contiguity:
                        contiguity.remove(j)
                    contiguity.append(j)
        while contiguity and sum(sizes[j] for j in contiguity) > contiguity_budget:
            contiguity.popleft()
        chosen.update(contiguity)
    return sorted(chosen)
