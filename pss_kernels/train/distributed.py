"""torchrun + DistributedDataParallel plumbing, and the sampler that shards data across ranks.

`torchrun --nproc_per_node G [--nnodes M ...] -m pss_kernels.train ...` sets RANK, WORLD_SIZE
and LOCAL_RANK; the process group uses NCCL on CUDA and gloo on CPU. Nothing here exchanges
the keep rate: every rank computes rho = schedule.keep_rate_at(step) from the same step.
"""
from __future__ import annotations

import gc
import importlib
import os
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, epoch) over the 63-bit seed space


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False; "
                             f"torch {torch.__version__}, CUDA build {torch.version.cuda})")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise a single-process DistInfo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        # torch._dynamo (which DistributedDataParallel imports) imported after the group exists keeps
        # a reference to it that destroy_process_group does not drop (torch 2.11 and 2.13): the group,
        # and gloo's worker threads, then live on to interpreter exit. Imported first, it does not.
        # See shutdown_distributed for why those threads must be gone by then.
        importlib.import_module("torch._dynamo")
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, resolved)


def shutdown_distributed() -> None:
    """Leave the process group and join its worker threads while the interpreter is still whole.

    A gloo worker thread drops the last collective's work after the caller has its result; the work
    holds tensors that own Python objects, so a worker still busy at interpreter exit takes the GIL
    during finalisation and aborts the process ("terminate called without an active exception",
    seen on torch 2.11 about once in 20 two-rank runs on a loaded CPU). Destroying the group joins
    its workers, but only once nothing else holds it: the collector frees the trainer's reference
    cycles (DDP among them) first, and init_distributed keeps torch._dynamo from holding it.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: List[float], info: DistInfo) -> List[float]:
    """Element-wise sum over ranks (float64 on the training device)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    if info.enabled:
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def sample_seed(seed: int, epoch: int, index: int, num_samples: int) -> int:
    """A distinct augmentation seed for each (run seed, epoch, sample index)."""
    return (seed * _SEED_MIX + epoch * num_samples + index) % (1 << 63)


class ShardedSampler(Sampler):
    """DistributedSampler with sample keys and a start offset.

    Epoch e permutes range(num_samples) with a generator seeded by (seed, e) (identity order
    without `shuffle`); rank r takes positions r, r + W, r + 2W, ... of it. With `drop_last`
    the permutation is cut to a multiple of W first so every rank runs the same number of
    steps (DDP needs that); without it ranks may differ by one sample (evaluation sums counts).
    `set_epoch(e, start=s)` skips this rank's first s samples: a resume mid-epoch continues
    with exactly the samples the uninterrupted run would have seen.
    Yields (index, sample_seed(seed, e, index)).
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        if num_samples < world_size:
            raise ValueError(f"num_samples={num_samples} is smaller than world_size={world_size}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _epoch_order(self) -> List[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed * _SEED_MIX + self.epoch) % (1 << 63))
            return torch.randperm(self.num_samples, generator=generator).tolist()
        return list(range(self.num_samples))

    def _rank_keys(self) -> List[Tuple[int, int]]:
        """This rank's (index, augmentation seed) pairs of the whole epoch, in order."""
        order = self._epoch_order()
        if self.drop_last:
            order = order[:self.num_samples - self.num_samples % self.world_size]
        return [(index, sample_seed(self.seed, self.epoch, index, self.num_samples))
                for index in order[self.rank::self.world_size]]

    def samples_per_rank(self) -> int:
        """This rank's samples in a whole epoch (before any start offset)."""
        if self.drop_last:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        yield from self._rank_keys()[self.start:]

    def __len__(self) -> int:
        return max(0, self.samples_per_rank() - self.start)


class RepeatedAugSampler(ShardedSampler):
    """DeiT's RASampler (repeated augmentation, Hoffer et al. 2020) with sample keys and a start offset.

    Epoch e permutes range(num_samples) with the generator of ShardedSampler, repeats every index
    `repeats` times in a row ([a, a, a, b, b, b, ...]), pads the list to a multiple of W with its own
    start, and gives rank r positions r, r + W, ...: the copies of one image land on consecutive
    ranks (on one rank, W = 1), each with its own augmentation seed. Each rank then takes its first
    num_samples // W keys, so an epoch has as many steps as without repetition and covers about
    1 / repeats of the images, each `repeats` times. (DeiT takes num_samples // 256 * 256 // W, a
    rounding for ImageNet's size; the rest is the same.) Copy j of index i gets
    sample_seed(seed, e, i * repeats + j, num_samples * repeats).
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, repeats: int = 3, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(num_samples, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, drop_last=True)
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.repeats = repeats

    def _rank_keys(self) -> List[Tuple[int, int]]:
        keys = [(index, sample_seed(self.seed, self.epoch, index * self.repeats + copy, self.num_samples * self.repeats))
                for index in self._epoch_order() for copy in range(self.repeats)]
        keys += keys[:(-len(keys)) % self.world_size]  # pad to a multiple of W (nothing when it is one)
        return keys[self.rank::self.world_size][:self.samples_per_rank()]
