"""A small cache of values derived from tensors' contents, shared by the ops' backends (no Triton
import: the sdpa backend of rpb_attention_varlen uses it too)."""
from __future__ import annotations

import collections
from typing import Any, Callable, Tuple

import torch


class TensorKeyedCache:
    """Values derived from tensors' contents, the last `kept` of them, keyed by each tensor's storage,
    shape, strides, dtype, device and version plus `extra`, with references to the tensors themselves,
    so that their memory cannot be reused by another tensor while the entry lives (an in-place change
    bumps the version). Every head and layer of a step then reuses what the first one built. Nothing is
    cached while a CUDA graph is being captured: a tensor made then holds its values only once the graph
    replays (see triton_bias_grad.shared_row_lists), nor for inference tensors (torch.inference_mode),
    which have no version, nor while torch.compile traces."""

    def __init__(self, kept: int):
        self.kept = kept
        self.entries: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()

    def get(self, tensors: Tuple[torch.Tensor, ...], extra: tuple, build: Callable[[], Any]):
        if any(t.device.type == "cuda" for t in tensors) and torch.cuda.is_current_stream_capturing():
            return build()
        if any(t.is_inference() for t in tensors):  # no version counter to key on: build it each time
            return build()
        if torch.compiler.is_compiling():  # traced tensors have no storage to key on
            return build()
        key = tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)
                    for t in tensors) + extra
        entry = self.entries.get(key)
        if entry is None:
            entry = (tensors, build())
            self.entries[key] = entry
            while len(self.entries) > self.kept:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        return entry[1]
