"""Small caches shared by the ops' backends (no Triton import: the torch reference and the sdpa backend
of rpb_attention_varlen use them too): values derived from tensors' contents, and constants of a key."""
from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Tuple

import torch


class TensorKeyedCache:
    """Values derived from tensors' contents, the last `kept` of them, keyed by each tensor's storage,
    shape, strides, dtype, device and version plus `extra`, with references to the tensors themselves,
    so that their memory cannot be reused by another tensor while the entry lives (an in-place change
    bumps the version). Every head and layer of a step then reuses what the first one built.

    A write the version counter does not see (through `.data`, a NumPy array sharing the memory, DLPack)
    is not seen here either: give the ops new tensors rather than rewriting old ones that way.

    Nothing is cached while a CUDA graph is being captured (a tensor made then holds its values only
    once the graph replays, see triton_bias_grad.shared_row_lists), under torch.inference_mode (its
    tensors have no version, and a value built there could not be saved for a later backward), or
    while torch.compile traces. Thread-safe (nn.DataParallel's replicas run in threads); two threads
    missing the same key may both build it."""

    def __init__(self, kept: int):
        self.kept = kept
        self.entries: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, tensors: Tuple[torch.Tensor, ...], extra: tuple, build: Callable[[], Any]):
        # First: while torch.compile traces, the other tests are themselves untraceable (and traced
        # tensors have no storage to key on).
        if torch.compiler.is_compiling():
            return build()
        if any(t.device.type == "cuda" for t in tensors) and torch.cuda.is_current_stream_capturing():
            return build()
        if torch.is_inference_mode_enabled() or any(t.is_inference() for t in tensors):
            return build()
        key = tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)
                    for t in tensors) + extra
        with self._lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
                return entry[1]
        value = build()  # outside the lock: a build may take a while (and syncs with the device)
        with self._lock:
            self.entries[key] = (tensors, value)
            self.entries.move_to_end(key)
            while len(self.entries) > self.kept:
                self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        """Drop every entry (what a benchmark does to time the build each call)."""
        with self._lock:
            self.entries.clear()


def cached_constant(cache: dict, key: tuple, device: torch.device, build: Callable[[], Any]):
    """cache[key], built on a miss: for values that depend on nothing but the key (the index tables of a
    grid). Never dropped, so that a CUDA graph that captured one keeps reading valid memory. While a graph
    is being captured a miss is built but not added (a tensor made then holds its values only once the
    graph replays, so caching it would hand garbage to later eager calls); entries built before are used.
    A plain dict, not functools.lru_cache: torch.compile traces through it cleanly (it warns about the
    cache wrapper)."""
    value = cache.get(key)
    if value is None:
        value = build()
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            cache[key] = value
    return value
