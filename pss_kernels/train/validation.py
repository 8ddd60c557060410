"""Validation: top-1 / top-5 accuracy (and forward throughput) of a model at one keep rate over a loader.

(`Trainer.validate` runs it at the end of epochs; `pss-evaluate`, pss_kernels/evaluate.py, sweeps it
over keep rates on a checkpoint.)"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_keep_rate
from .distributed import DistInfo, all_reduce_sum


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    """bf16 autocast on `device`, or nothing when dtype is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def validate(model: nn.Module, loader, *, device: torch.device, keep_rate: float = 1.0,
             autocast_dtype: Optional[torch.dtype] = None, dist_info: Optional[DistInfo] = None) -> dict:
    """{"top1": % correct, "top5": % with the label among the 5 highest logits (all of them with
    fewer than 5 classes), "loss": mean cross-entropy, "images": count (all ranks),
    "images_per_s": this process's images / seconds spent in forward passes} at `keep_rate`.

    `keep_rate` goes to every forward call, so the result never depends on `model.keep_rate`
    (which a schedule may have left below 1: the model samples in eval mode too). None is refused.

    `model` is the plain module (not the DDP wrapper): ranks may hold different numbers of
    batches here, and counts are summed across ranks at the end.
    """
    keep_rate = check_keep_rate(keep_rate)
    was_training = model.training
    model.eval()
    correct = correct5 = seen = 0
    loss_sum = forward_seconds = 0.0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        synchronize(device)
        start = time.perf_counter()
        with autocast_context(device, autocast_dtype):
            logits = model(images, keep_rate=keep_rate)
        synchronize(device)
        forward_seconds += time.perf_counter() - start
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += int((logits.argmax(dim=-1) == labels).sum())
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct5 += int((top5 == labels[:, None]).any(dim=-1).sum())
        seen += len(labels)
    local_images = seen
    if dist_info is not None:
        correct, correct5, seen, loss_sum = all_reduce_sum([correct, correct5, seen, loss_sum], dist_info)
    model.train(was_training)
    if seen == 0:
        raise ValueError("validate: the loader yielded no images")
    return {"top1": 100.0 * correct / seen, "top5": 100.0 * correct5 / seen, "loss": loss_sum / seen,
            "images": int(seen),
            "images_per_s": local_images / forward_seconds if forward_seconds > 0 else None}
