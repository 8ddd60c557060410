"""Example-level filtering of Tri-Level E-ViT (Kong et al. 2023, "Peeling the Onion", Sec. "Sparsity in
Training Examples"): forgetting events counted per example on the device, a random m % of the
training set dropped at the start, and a periodic remove-and-restore.

Counting (Toneva et al. 2018, as the paper uses it). Every training step records, for each example
of the batch, whether the training forward classified it correctly (argmax of the logits against
its label; with Mixup / CutMix against the label of the unmixed image) and the variance of the
head-averaged attention of the CLS query over the patch tokens in the last block (`ClsAttentionCapture`:
the fused kernel's return_cls_attention on impl="pss", peers.cls_attention elsewhere). At the end
of each epoch an example presented in it is *correct* if every presentation was (one, without
repeated augmentation); a correct -> wrong change between two epochs it was presented in is a
forgetting event. Everything lives in int / bool / float64 tensors on the training device, and the
per-step observations of every rank are all-gathered and applied on every rank (integer sums, the
variance in fixed point: exact in any order), so every rank holds the same counts.

Ranking. Least informative first: fewest forgetting events (an example never classified correctly
counts as forgotten infinitely often, Toneva et al.'s rule: it is hard, not easy), ties broken by
the lower variance of the CLS attention (uniform attention: the paper's "similarity of the image
patches", a simpler image), then by the lower index.

Remove and restore (the paper's "Online Example Filtering"). Before training, round(m N) of the N
examples are dropped at random (a generator seeded by --seed: the same rule on every rank); the
subset keeps round(r_e N) examples, r_e = 1 - m (--example-keep). At the end of every `period`-th
epoch (30), for `iterations` times, round(n N) examples (n = 5 %) are removed from the subset, the
least informative by the ranking, and as many of the examples that were out of the subset before
this iteration are restored, at random. The subset size, and so the epoch length, stays constant.
The paper iterates "the number of times in which all the removed data can be covered": 3 times
(epochs 30, 60, 90) for 10 % removed, 5 times (to 150) for 20 %, i.e. round(m / n) + 1 (the default).

Every tensor and counter is in the checkpoint (`state_dict`), so a resumed run continues bit for bit;
at each remove-and-restore the ranks compare a digest of the subset and stop if they differ.

In the trainer (`--example-keep r_e`): `ExampleFilterHook` wraps the dataset (each item also gives
its index), sizes the sampler to the subset and maps its positions to the subset's examples, counts
each step's examples from the training forward and captures the last block's CLS attention.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ..distributed import DistInfo, all_gather_objects
from .base import Method, MethodHook, RunContext, register

VARIANCE_SCALE = float(2 ** 40)  # fixed point for the variance sums: exact and order-free
NEVER_LEARNED = 2 ** 40          # the forgetting count of an example never classified correctly
_FILTER_SEED = 0x5DEECE66D


class ExampleFilter:
    """The example-level state of a run over `num_examples` training examples (see the module
    docstring). `keep`: r_e in (0, 1); `period`: epochs between remove-and-restore; `fraction`: n,
    the share of the dataset removed and restored each time; `iterations`: how many times (None:
    round((1 - keep) / fraction) + 1, the paper's 3 for keep 0.9 and 5 for keep 0.8); `last_epoch`:
    the run's length in epochs (no round at its end, where nothing would train on the new subset)."""

    name = "filtering"

    def __init__(self, num_examples: int, *, keep: float, period: int = 30, fraction: float = 0.05,
                 iterations: Optional[int] = None, seed: int = 0, device: torch.device = torch.device("cpu"),
                 dist_info: Optional[DistInfo] = None, last_epoch: Optional[int] = None):
        if not 0.0 < keep < 1.0:
            raise ValueError(f"example keep rate must be in (0, 1), got {keep}")
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"filter fraction must be in (0, 1), got {fraction}")
        if period < 1:
            raise ValueError(f"filter period must be >= 1 epoch, got {period}")
        self.num_examples, self.keep, self.period, self.fraction, self.seed = num_examples, keep, period, fraction, seed
        self.kept = max(1, round(keep * num_examples))
        self.moved = min(round(fraction * num_examples), num_examples - self.kept)
        self.iterations = round((1.0 - keep) / fraction) + 1 if iterations is None else iterations
        self.device, self.dist, self.last_epoch = torch.device(device), dist_info, last_epoch
        zeros = dict(device=self.device)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 7919 + _FILTER_SEED))
        self.active = torch.zeros(num_examples, dtype=torch.bool, **zeros)
        self.active[order[:self.kept].to(self.device)] = True
        self.forgetting = torch.zeros(num_examples, dtype=torch.int64, **zeros)
        self.last_correct = torch.zeros(num_examples, dtype=torch.bool, **zeros)
        self.learned = torch.zeros(num_examples, dtype=torch.bool, **zeros)
        self.variance = torch.zeros(num_examples, dtype=torch.float64, **zeros)
        self.presentations = torch.zeros(num_examples, dtype=torch.int64, **zeros)
        self.epoch_seen = torch.zeros(num_examples, dtype=torch.int64, **zeros)
        self.epoch_correct = torch.zeros(num_examples, dtype=torch.int64, **zeros)
        self.epoch_variance = torch.zeros(num_examples, dtype=torch.int64, **zeros)
        self.iterations_done = 0
        self.epochs_done = 0
        self.history: List[dict] = []  # per remove-and-restore: epoch, removed, restored (indices)
        self._subset: Optional[List[int]] = None

    # ---- the subset --------------------------------------------------------------------------
    def subset(self) -> List[int]:
        """The dataset indices in the training subset, ascending (cached until the subset changes)."""
        if self._subset is None:
            self._subset = torch.nonzero(self.active).flatten().cpu().tolist()
        return self._subset

    def digest(self) -> str:
        return hashlib.sha256(self.active.cpu().numpy().tobytes()).hexdigest()

    # ---- counting ----------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, indices: torch.Tensor, correct: torch.Tensor, variance: Optional[torch.Tensor]) -> None:
        """One step's examples: dataset `indices` (B,), `correct` (B,) bool, CLS-attention `variance`
        (B,) (None: zeros). All ranks' observations are gathered and applied on every rank."""
        indices = indices.to(self.device, torch.int64)
        fixed = (torch.zeros(len(indices), dtype=torch.int64, device=self.device) if variance is None else
                 (variance.detach().to(self.device, torch.float64) * VARIANCE_SCALE).round().to(torch.int64))
        rows = torch.stack([indices, correct.to(self.device, torch.int64), fixed], dim=1)
        if self.dist is not None and self.dist.enabled:
            gathered = [torch.empty_like(rows) for _ in range(self.dist.world_size)]
            dist.all_gather(gathered, rows)
            rows = torch.cat(gathered)
        indices, correct, fixed = rows.unbind(1)
        self.epoch_seen.index_add_(0, indices, torch.ones_like(indices))
        self.epoch_correct.index_add_(0, indices, correct)
        self.epoch_variance.index_add_(0, indices, fixed)

    @torch.no_grad()
    def finish_epoch(self) -> None:
        """Fold the epoch's observations into the counts (forgetting events: correct -> wrong)."""
        seen = self.epoch_seen > 0
        correct = seen & (self.epoch_correct == self.epoch_seen)
        self.forgetting += (seen & self.last_correct & ~correct).to(torch.int64)
        self.learned |= correct
        self.last_correct = torch.where(seen, correct, self.last_correct)
        mean = self.epoch_variance.to(torch.float64) / self.epoch_seen.clamp(min=1).to(torch.float64) / VARIANCE_SCALE
        self.variance = torch.where(seen, mean, self.variance)
        self.presentations += self.epoch_seen
        for accumulator in (self.epoch_seen, self.epoch_correct, self.epoch_variance):
            accumulator.zero_()

    def ranking(self) -> torch.Tensor:
        """Indices of the subset's examples, least informative first (forgetting events, never-learned
        last; then CLS-attention variance; then index)."""
        count = torch.where(self.learned, self.forgetting, torch.full_like(self.forgetting, NEVER_LEARNED))
        order = torch.argsort(self.variance, stable=True)
        order = order[torch.argsort(count[order], stable=True)]
        return order[self.active[order]]

    @torch.no_grad()
    def remove_and_restore(self, epoch: int) -> Tuple[List[int], List[int]]:
        """Remove the `moved` least informative examples of the subset and restore as many of those
        removed before, drawn at random; returns (removed, restored) dataset indices."""
        pool = torch.nonzero(~self.active).flatten()
        generator = torch.Generator().manual_seed(self.seed * 7919 + _FILTER_SEED + 1 + self.iterations_done)
        count = min(self.moved, len(pool))
        restored = pool[torch.randperm(len(pool), generator=generator)[:count].to(self.device)]
        removed = self.ranking()[:count]
        self.active[removed] = False
        self.active[restored] = True
        self._subset = None
        self.iterations_done += 1
        removed_list, restored_list = sorted(removed.cpu().tolist()), sorted(restored.cpu().tolist())
        self.history.append({"epoch": epoch, "removed": removed_list, "restored": restored_list})
        if self.dist is not None and self.dist.enabled:
            digests = all_gather_objects(self.digest(), self.dist)
            if len(set(digests)) > 1:
                raise RuntimeError(f"example filtering: the ranks hold different subsets after epoch {epoch} "
                                   f"(digests {digests}); the observations were not the same on every rank")
        return removed_list, restored_list

    # ---- epochs ----------------------------------------------------------------------------------
    def end_epoch(self, epochs_done: int) -> Optional[dict]:
        """At the end of epoch `epochs_done` (1-based; once each, also across a resume): fold the
        counts, and remove-and-restore on the period. Returns a log record when the subset changed."""
        if epochs_done <= self.epochs_done:
            return None
        self.epochs_done = epochs_done
        self.finish_epoch()
        trains_on = self.last_epoch is None or epochs_done < self.last_epoch  # no round after the last epoch
        if epochs_done % self.period == 0 and self.iterations_done < self.iterations and trains_on:
            removed, restored = self.remove_and_restore(epochs_done)
            return {"type": "filter", "epoch": epochs_done, "iteration": self.iterations_done,
                    "removed": len(removed), "restored": len(restored), "subset": self.kept,
                    "forgetting_events": int(self.forgetting.sum()), "digest": self.digest()}
        return None

    TENSORS = ("active", "forgetting", "last_correct", "learned", "variance", "presentations", "epoch_seen",
               "epoch_correct", "epoch_variance")

    def settings(self) -> dict:
        return {"num_examples": self.num_examples, "kept": self.kept, "moved": self.moved,
                "iterations": self.iterations, "period": self.period, "seed": self.seed}

    def state_dict(self) -> dict:
        return {"settings": self.settings(), "iterations_done": self.iterations_done, "epochs_done": self.epochs_done,
                "history": self.history, **{name: getattr(self, name).cpu() for name in self.TENSORS}}

    def load_state_dict(self, state: dict) -> None:
        if dict(state["settings"]) != self.settings():
            raise ValueError(f"example filtering settings differ: checkpoint {dict(state['settings'])}, "
                             f"now {self.settings()}")
        for name in self.TENSORS:
            setattr(self, name, state[name].to(self.device))
        self.iterations_done, self.epochs_done = int(state["iterations_done"]), int(state["epochs_done"])
        self.history = [dict(entry) for entry in state["history"]]
        self._subset = None


class IndexedDataset(Dataset):
    """dataset[key] + (the example's index,): the trainer needs it to count per example."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return (*self.dataset[key], int(index))


class SubsetSampler:
    """A ShardedSampler / RepeatedAugSampler over the positions of the filter's subset, yielding the
    dataset indices at those positions (with the inner sampler's augmentation seeds). The subset is
    read when an epoch's iterator starts, so a remove-and-restore takes effect at the next epoch."""

    def __init__(self, inner, example_filter: ExampleFilter):
        if inner.num_samples != example_filter.kept:
            raise ValueError(f"the sampler covers {inner.num_samples} examples, the subset {example_filter.kept}")
        self.inner, self.filter = inner, example_filter

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch, start)

    def samples_per_rank(self) -> int:
        return self.inner.samples_per_rank()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        subset = self.filter.subset()
        for position, seed in self.inner:
            yield subset[position], seed

    def __len__(self) -> int:
        return len(self.inner)


class ClsAttentionCapture:
    """Forward hooks on the last block's attention that make it also return the head-averaged CLS
    attention (stats="cls": from the kernel on impl="pss") during training, keep the variance of its
    patch-token part per image, and hand the block its plain output. A no-op in eval mode."""

    def __init__(self, model):
        self.attention = model.blocks[-1].attn
        self.variance: Optional[torch.Tensor] = None
        self._added = False
        self._handles = [self.attention.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.attention.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, module, args, kwargs):
        self._added = module.training and kwargs.get("stats") is None
        if self._added:
            return args, {**kwargs, "stats": "cls"}
        return None

    def _after(self, module, args, kwargs, output):
        if not module.training:
            return None
        cls_attention = output[1]
        self.variance = cls_attention[:, 1:].float().var(dim=1, unbiased=False).detach()
        return output[0] if self._added else None

    def take(self) -> Optional[torch.Tensor]:
        variance, self.variance = self.variance, None
        return variance

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class ExampleFilterHook(MethodHook):
    """Tri-Level's example level in the trainer: the ExampleFilter of the run, the dataset and
    sampler wrapped around its subset, and the CLS-attention capture it ranks by."""

    name = "filtering"
    summary_key = "filtering"

    def __init__(self, model, config, dist_info: DistInfo):
        self.model, self.config, self.dist_info = model, config, dist_info
        self.filter: Optional[ExampleFilter] = None
        self.capture: Optional[ClsAttentionCapture] = None

    def wrap_dataset(self, dataset):
        config = self.config
        self.filter = ExampleFilter(len(dataset), keep=config.example_keep, period=config.filter_every,
                                    fraction=config.filter_fraction, iterations=config.filter_iterations,
                                    seed=config.seed, device=self.dist_info.device, dist_info=self.dist_info,
                                    last_epoch=config.epochs)
        return IndexedDataset(dataset)

    def sampled_examples(self, num_examples: int) -> int:
        return self.filter.kept

    def wrap_sampler(self, sampler):
        return SubsetSampler(sampler, self.filter)

    def attach(self, run: RunContext) -> None:
        self.capture = ClsAttentionCapture(self.model)

    def observe(self, batch, logits, labels) -> None:
        """batch[2]: the dataset indices (IndexedDataset); correct = argmax of the training logits."""
        self.filter.observe(batch[2], logits.argmax(-1) == labels, self.capture.take())

    def end_epoch(self, epochs_done: int) -> Optional[dict]:
        event = self.filter.end_epoch(epochs_done)
        if event is not None:
            event["message"] = (f"epoch {epochs_done}: example filter round {event['iteration']}: removed "
                                f"{event['removed']}, restored {event['restored']} of {event['subset']}")
        return event

    def record(self, tokens: int) -> dict:
        return {"examples": self.filter.kept}

    def state_dict(self) -> dict:
        return self.filter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.filter.load_state_dict(state)

    def summary(self) -> dict:
        f = self.filter
        return {"subset": f.kept, "examples": f.num_examples,
                "rounds": [{"epoch": h["epoch"], "removed": len(h["removed"]), "restored": len(h["restored"])}
                           for h in f.history],
                "forgetting_events": int(f.forgetting.sum())}


register(Method(
    name=ExampleFilterHook.name, summary_key=ExampleFilterHook.summary_key,
    flags="--example-keep r_e [--filter-every 30 --filter-fraction 0.05]",
    description="Tri-Level E-ViT's example level (forgetting events, remove-and-restore)",
    enabled=lambda config: config.example_keep is not None,
    build_hook=lambda config, model, dist_info: ExampleFilterHook(model, config, dist_info),
    apply_state=lambda model, state: None,  # the subset does not change the model
))
