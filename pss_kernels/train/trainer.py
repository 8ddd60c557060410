"""The training loop: a ViT, a patch sampling schedule, AdamW / SGD + warm-up/cosine LR, checkpoints.

Each iteration t:
    images, targets = augment(images, labels)   (device side, seeded by (seed, t, rank); optional)
    rho_t = schedule.keep_rate_at(t)            (pure function of t: same on every rank)
    loss = CE(model(images, keep_rate=rho_t), targets)   (1.0 skips the sampler; otherwise k = round(rho_t N);
                                                 smoothed, or soft targets with Mixup / CutMix; bf16 autocast on CUDA)
    optimizer step, LR step, schedule step, EMA update
The keep rate reaches the model as a call argument (DDP and torch.compile pass it through): the
trainer never writes `model.keep_rate`, which stays 1.0, so evaluation and anything else that calls
the model without a rate sees every token.

Everything random is either restored from the checkpoint (global RNGs) or a function of
(seed, epoch, index) (data order and loader augmentation) or of (seed, step, rank) (device
augmentation), so `--resume` continues bit for bit on CPU;
on a GPU it does with `deterministic=True` (`--deterministic`: ordered bias-gradient accumulation
in rpb_attention and torch.use_deterministic_algorithms for the rest of the step).

Methods (Tri-Level's levels, Budgeted Training's growth) are hooks (train/methods/): the trainer
builds those the config enables and calls them at fixed points (train/methods/base.py lists the
calls); it never names a method. Their state is in the checkpoint under "methods".
"""
from __future__ import annotations

import sys

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .._checks import check_keep_rate
from ..ops.sample_patches import num_kept_tokens
from ..schedules import build_schedule
from .data.augment import TrainLoss, build_device_augment, check_augment_dependencies, needs_unit_range, step_seed
from .data.gpu_decode import collate_encoded
from .build import (autocast_dtype_for, build_data, build_device_images, build_model, build_sampler, check_backends,
                    deterministic_algorithms, init_from_pretrained, parameters_sha256, raise_recompile_limit,
                    seed_everything)
from .checkpoint import (CheckpointError, capture_rng_state, check_config_matches, load_checkpoint, load_state,
                         restore_rng_state, save_checkpoint)
from .config import RESUMABLE_CHANGES, TrainConfig, config_from_dict, config_to_dict
from .distributed import DistInfo, ShardedSampler, all_gather_objects, barrier
from .validation import autocast_context, synchronize, validate
from .methods import REGISTRY, RunContext, build_hooks, check_config, key_shares, step_key
from .optim import ModelEma, base_lr, build_lr_scheduler, build_optimizer, resolve_learning_rates
from .reporting import IterationFlops, JsonLinesLog, ProgressBar, format_summary, peak_memory_mb
from .timing import KeepRateTimes, projected_time_summary

CHECKPOINT_NAME = "checkpoint.pt"


class Trainer:
    def __init__(self, config: TrainConfig, dist_info: DistInfo):
        config.world_size = dist_info.world_size
        self.config, self.dist, self.device = config, dist_info, dist_info.device
        self.out_dir = Path(config.out_dir)
        self._check_same_config_on_every_rank()
        check_config(config)
        check_backends(config, self.device)
        check_augment_dependencies(config)
        self.resume_path = self._resume_path(config.resume)

        seed_everything(config.seed)  # identical initial weights on every rank
        self.train_set, self.info = build_data(config, train=True, normalize=not needs_unit_range(config),
                                               device=self.device)
        # With a GPU decoder the loader yields file bytes and crop boxes; this turns them into pixels.
        self.device_images = build_device_images(config, self.info, self.device,
                                                 normalize=not needs_unit_range(config))
        self.val_set, _ = build_data(config, train=False)
        self.model = build_model(config, self.info)
        # A fresh run only: a resumed one takes its weights from the checkpoint.
        self.init_report = init_from_pretrained(self.model, config.init_from) \
            if config.init_from and self.resume_path is None else None
        if self.init_report is not None and dist_info.is_main:
            print(f"pss-train: --init-from {config.init_from}:\n{self.init_report}", flush=True)
        self.model = self.model.to(self.device)
        self.num_tokens = 1 + self.model.patch_embed.num_patches

        # The methods' hooks (train/methods/), in registry order; none without method flags.
        self.hooks = build_hooks(config, self.model, dist_info)
        full_size = len(self.train_set)
        sampled = full_size
        for hook in self.hooks:
            self.train_set = hook.wrap_dataset(self.train_set)
            sampled = hook.sampled_examples(sampled)
        self.train_sampler = build_sampler(config, dist_info, sampled)
        for hook in self.hooks:
            self.train_sampler = hook.wrap_sampler(self.train_sampler)
        self.steps_per_epoch = self.train_sampler.samples_per_rank() // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size={config.batch_size} exceeds the {self.train_sampler.samples_per_rank()} "
                             f"training images per process: no full batch per epoch")
        # The full-size run the time summary compares with: every example, every token, full width.
        self.full_steps_per_epoch = (full_size // dist_info.world_size) // config.batch_size
        run = RunContext(config, self.model, self.steps_per_epoch, dist_info=dist_info)
        method_schedules = [(hook.name, schedule) for hook in self.hooks
                            if (schedule := hook.keep_rate_schedule(run)) is not None]
        if len(method_schedules) > 1:
            raise ValueError(f"methods {[name for name, _ in method_schedules]} each set the input keep rate; "
                             f"use one of them")
        self.schedule = method_schedules[0][1] if method_schedules else build_schedule(
            config.schedule, total_steps=config.epochs * self.steps_per_epoch, steps_per_epoch=self.steps_per_epoch)
        self.total_steps = self.schedule.total_steps  # a budget schedule sets its own length
        self.lrs = resolve_learning_rates(lr=config.lr, min_lr=config.min_lr, warmup_lr=config.warmup_lr,
                                          scaling=config.lr_scaling, base_batch=config.lr_base_batch,
                                          global_batch=config.batch_size * dist_info.world_size)
        self.optimizer = build_optimizer(self.model, lr=self.lrs.lr, weight_decay=config.weight_decay,
                                         optimizer=config.optimizer, momentum=config.momentum,
                                         layer_decay=config.layer_decay)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, lr=self.lrs.lr, min_lr=self.lrs.min_lr, warmup_lr=self.lrs.warmup_lr,
            total_steps=self.total_steps, shape=config.lr_schedule,
            warmup_steps=min(self.total_steps, round(config.warmup_epochs * self.steps_per_epoch)))
        self.ema = ModelEma(self.model, config.ema_decay) if config.ema_decay > 0 else None
        run.total_steps, run.schedule, run.optimizer, run.ema = self.total_steps, self.schedule, self.optimizer, self.ema
        for hook in self.hooks:
            hook.attach(run)
        self.autocast_dtype = autocast_dtype_for(config.precision, self.device)
        self.criterion = TrainLoss(config.label_smoothing)
        augment = build_device_augment(config, self.info.mean, self.info.std, self.info.num_classes)
        self.augment = augment.to(self.device) if augment is not None else None
        # The FLOP twin runs eager attention (the fused ops are opaque to the counter) on dense tokens:
        # a packed step is counted at its images' mean kept tokens (packed_cost_rate).
        counting = dataclasses.replace(config, attn_impl="eager-index" if config.rpb else config.attn_impl,
                                       sampler_backend=None, attn_backend=None, allocation="fixed")
        self.flops = IterationFlops(lambda: build_model(counting, self.info),
                                    (config.batch_size, 3, self.info.img_size, self.info.img_size))
        self.train_loader = self._loader(self.train_set, self.train_sampler)
        self.val_loader = self._loader(self.val_set, ShardedSampler(
            len(self.val_set), rank=dist_info.rank, world_size=dist_info.world_size, shuffle=False,
            seed=config.seed, drop_last=False), drop_last=False)

        self.train_model = self.model
        if dist_info.enabled:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        # The joint schedule of the input rate and the methods' settings, when a method changes the cost.
        self.key_shares = self.key_settings = None
        if any(hook.values(np.zeros(1, dtype=np.int64)) for hook in self.hooks):
            self.key_shares, self.key_settings = key_shares(self.schedule, self.hooks, self.num_tokens,
                                                            self.total_steps)
        if config.compile:
            raise_recompile_limit(len(self.key_shares) if self.key_shares else len(self.schedule.shares()))
            self.train_model = torch.compile(self.train_model)

        self.step = 0
        self.times = KeepRateTimes(self.num_tokens)
        seed_everything(config.seed + dist_info.rank)  # dropout / drop-path masks differ across ranks
        if self.resume_path is not None:
            self._resume(self.resume_path)

    # ---- set-up helpers -------------------------------------------------------------------
    def _check_same_config_on_every_rank(self) -> None:
        settings = json.dumps(config_to_dict(self.config), sort_keys=True)
        if len(set(all_gather_objects(settings, self.dist))) > 1:
            raise ValueError("ranks were started with different settings; launch every rank with the same "
                             "command line")

    def _loader(self, dataset, sampler: ShardedSampler, drop_last: bool = True) -> DataLoader:
        # A private generator: creating a loader iterator must not draw from the global RNG, or a run
        # resumed mid-epoch would see different dropout masks than the uninterrupted one.
        # Workers stay alive across epochs (no re-import and re-open per epoch) and keep 4 batches each
        # in flight, so that a step at rho = 0.2, several times shorter than at rho = 1, finds its batch ready.
        workers = self.config.workers
        encoded = self.device_images is not None and dataset is self.train_set
        return DataLoader(dataset, batch_size=self.config.batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=workers, pin_memory=self.device.type == "cuda", generator=torch.Generator(),
                          persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                          collate_fn=collate_encoded if encoded else None)

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng_states = all_gather_objects(capture_rng_state(), self.dist)
        return {
            "config": config_to_dict(self.config),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": rng_states,
            "timing": self.times.state_dict(),
            "init_from": self.init_report,
            "methods": {hook.name: hook.state_dict() for hook in self.hooks},
        }

    def save(self) -> None:
        state = self.state_dict()  # every rank: the RNG gather is collective
        if self.dist.is_main:
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, state)
        barrier(self.dist)

    def _resume_path(self, resume: Optional[str]) -> Optional[Path]:
        """The checkpoint to continue from; None for a fresh run (no --resume, or auto with none yet)."""
        if not resume:
            return None
        path = self.out_dir / CHECKPOINT_NAME if resume == "auto" else Path(resume)
        if resume == "auto" and not path.is_file():
            return None
        return path

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        try:
            # Through TrainConfig: settings newer than the checkpoint compare as their defaults.
            saved = config_to_dict(config_from_dict(state["config"]))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {str(path)!r} has no usable config: {err}") from err
        try:
            check_config_matches(saved, config_to_dict(self.config), RESUMABLE_CHANGES, path)
            load_state(self.model, state["model"], "model", path)
            if self.ema is not None:
                load_state(self.ema, state["ema"], "EMA", path)
            load_state(self.optimizer, state["optimizer"], "optimizer", path)
            load_state(self.lr_scheduler, state["lr_scheduler"], "LR scheduler", path)
            load_state(self.schedule, state["schedule"], "patch schedule", path)
            self.times.load_state_dict(state["timing"])
            methods = state.get("methods", {})  # absent in checkpoints before the method hooks
            for hook in self.hooks:
                if hook.name not in methods:
                    raise CheckpointError(f"checkpoint {str(path)!r} has no {hook.name} state")
                try:
                    hook.load_state_dict(methods[hook.name])
                except (ValueError, RuntimeError) as err:
                    raise CheckpointError(f"checkpoint {str(path)!r}: the {hook.name} state does not fit this "
                                          f"run: {err}") from err
            self.init_report = state.get("init_from")  # absent in checkpoints before --init-from
            self.step = int(state["step"])
            rng = state["rng"][self.dist.rank]
        except KeyError as err:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks {err}; it was not written by this trainer") from err
        if self.step != self.schedule.current_step or self.step > self.total_steps:
            raise CheckpointError(f"checkpoint {str(path)!r} is inconsistent: step {self.step}, patch schedule at "
                                  f"step {self.schedule.current_step}, run length {self.total_steps}")
        restore_rng_state(rng)

    # ---- the loop ---------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, targets: torch.Tensor, keep_rate: float) -> torch.Tensor:
        """One optimizer step on a batch; `targets` are labels (B,) or soft targets (B, K)."""
        # The rate is a call argument (DDP and torch.compile pass keyword arguments through): the
        # model's own keep_rate stays 1.0, so between steps, in eval mode too, it keeps every token.
        with autocast_context(self.device, self.autocast_dtype):
            logits = self.train_model(images, keep_rate=keep_rate)
        self.last_logits = logits.detach()
        loss = self.criterion(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.schedule.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    def validate(self, keep_rate: float = 1.0) -> dict:
        """Validation top-1, top-5 and loss of the model (and its EMA) at `keep_rate`, passed to every forward
        call: the result does not depend on the rate the schedule left on the model."""
        result = {"type": "eval", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                  "keep_rate": check_keep_rate(keep_rate)}
        models = {"": self.model, "ema_": self.ema.module if self.ema is not None else None}
        for prefix, model in models.items():
            if model is not None:
                metrics = validate(model, self.val_loader, device=self.device, keep_rate=keep_rate,
                                   autocast_dtype=self.autocast_dtype, dist_info=self.dist)
                result.update({f"{prefix}top1": metrics["top1"], f"{prefix}top5": metrics["top5"],
                               f"{prefix}loss": metrics["loss"]})
        return result

    def fit(self) -> dict:
        """Train until the schedule's last step (or --stop-at-step); returns the run summary."""
        with deterministic_algorithms(self.config.deterministic):
            return self._fit()

    def _fit(self) -> dict:
        config, dist_info = self.config, self.dist
        stop = self.total_steps if config.stop_at_step is None else min(self.total_steps, config.stop_at_step)
        log = JsonLinesLog(self.out_dir / "log.jsonl") if dist_info.is_main else (
            JsonLinesLog(self.out_dir / f"log.rank{dist_info.rank}.jsonl") if config.log_all_ranks else None)
        bar = ProgressBar(self.total_steps, config.log_interval, enabled=config.progress and dist_info.is_main)
        if dist_info.is_main:
            bar.message(f"pss-train: {config.model} on {config.data} ({len(self.train_set)} images), "
                        f"{self.total_steps} steps x {config.batch_size * dist_info.world_size} images, "
                        f"schedule {self.schedule!r}, mean rho {self.schedule.mean_keep_rate():.3f}"
                        + (f", recipe {config.recipe}" if config.recipe else ""))
            bar.message(f"learning rate: {self.lrs.rule}")
            if self.device_images is not None:
                bar.message(f"data: the training crops decode on {self.device} with {self.device_images.name} "
                            f"(files it does not take decode on the CPU, counted as decode_fallbacks)")
            if config.data == "digits" and config.scorer == "l1" and self.schedule.mean_keep_rate() < 1.0:
                from .cli import MAGNITUDE_FAILS_ON_DIGITS
                # A warning about the run's outcome: printed with --no-progress too.
                print(f"pss-train: note: {MAGNITUDE_FAILS_ON_DIGITS}", file=sys.stderr, flush=True)
            if config.color_jitter > 0 and config.rand_augment:
                bar.message(f"note: --color-jitter {config.color_jitter:g} is inactive with --rand-augment "
                            f"(timm's rule, as in DeiT's own run)")
        if log is not None:
            log.write({"type": "config", "step": self.step, "config": config_to_dict(config),
                       "lr_rule": self.lrs.rule, "lr": self.lrs.lr, "min_lr": self.lrs.min_lr,
                       "warmup_lr": self.lrs.warmup_lr})
            if self.init_report is not None and self.step == 0:
                log.write({"type": "init_from", "path": config.init_from, "report": self.init_report})
        last_eval = last_batch = None
        global_batch = config.batch_size * dist_info.world_size
        start_wall = time.perf_counter()
        while self.step < stop:
            epoch, batch_in_epoch = divmod(self.step, self.steps_per_epoch)
            self.train_sampler.set_epoch(epoch, start=batch_in_epoch * config.batch_size)
            self.train_model.train()
            batch_start = time.perf_counter()
            for batch in self.train_loader:
                images, labels = batch[0], batch[1]
                if self.device_images is not None:
                    images = self.device_images(images)  # decoded, cropped, resized on the device
                else:
                    images = images.to(self.device, non_blocking=True)
                targets = labels.to(self.device, non_blocking=True)
                hard_labels = targets
                if self.augment is not None:
                    seed = step_seed(config.seed, self.step, dist_info.rank, dist_info.world_size)
                    images, targets = self.augment(images, targets, seed)
                compute_start = time.perf_counter()
                for hook in self.hooks:
                    hook.before_step(self.step)
                rho, lr = self.schedule.keep_rate, base_lr(self.optimizer)
                loss = self.train_step(images, targets, rho)
                for hook in self.hooks:
                    hook.observe(batch, self.last_logits, hard_labels)
                synchronize(self.device)
                done = time.perf_counter()
                last_batch = (images, targets)
                data_time, compute_time = compute_start - batch_start, done - compute_start
                cost_rate, packed_tokens = self.packed_cost_rate(rho)
                key = self.cost_key(cost_rate)
                self.times.add_key(key, data_time + compute_time)
                loss_value = loss.item()
                if not np.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at step {self.step} (rho={rho})")
                tokens = num_kept_tokens(self.num_tokens, cost_rate) if cost_rate < 1.0 else self.num_tokens
                record = {"type": "train", "step": self.step, "epoch": epoch, "rho": rho, "tokens": tokens,
                          "loss": loss_value, "lr": lr,
                          "data_time": data_time, "compute_time": compute_time,
                          "images_per_s": global_batch / (data_time + compute_time),
                          "flops": self.count_flops(key, cost_rate) if log is not None else None,
                          "peak_mem_mb": peak_memory_mb(self.device)[0]}
                if packed_tokens is not None:
                    record["packed_tokens"] = packed_tokens  # the step's mean tokens per image, unrounded
                if self.device_images is not None:
                    record["decode_fallbacks"] = self.device_images.fallbacks  # so far: decoded on the CPU
                if self.hooks:
                    record["key"] = key if isinstance(key, int) else str(key)
                    for hook in self.hooks:
                        record.update(hook.record(tokens))
                self.step += 1
                if log is not None:
                    log.write(record)
                bar.update(self.step, f"ep {epoch + 1} rho={rho:.2f} loss={loss_value:.4f} "
                                      f"lr={lr:.2e} {record['images_per_s']:.0f} img/s")
                if config.save_every and self.step % config.save_every == 0:
                    self.save()
                if self.step >= stop or self.step % self.steps_per_epoch == 0:
                    break
                batch_start = time.perf_counter()
            finished_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
            if finished_epoch:
                epochs_done = -(-self.step // self.steps_per_epoch)
                for hook in self.hooks:
                    event = hook.end_epoch(epochs_done)
                    if event is not None:
                        message = event.pop("message", None)
                        if log is not None:
                            log.write({**event, "step": self.step})
                        if message:
                            bar.message(message)
                if self.step == self.total_steps or (config.eval_every and epochs_done % config.eval_every == 0):
                    last_eval = self.validate()
                    if log is not None:
                        log.write(last_eval)
                    bar.message(f"epoch {epochs_done}: val top-1 {last_eval['top1']:.2f} % "
                                f"top-5 {last_eval['top5']:.2f} % loss {last_eval['loss']:.4f}")
            if finished_epoch or self.step >= stop:
                if not (config.save_every and self.step % config.save_every == 0):
                    self.save()
        bar.close()
        return self._finish(log, last_eval, time.perf_counter() - start_wall, last_batch)

    def packed_cost_rate(self, rho: float) -> Tuple[float, Optional[float]]:
        """(the rate a step is timed and counted at, the packed step's mean tokens per image or None).
        A packed step (allocation budget / mass at rho < 1) is timed and counted by the tokens its images
        kept: their mean, as the model's packed path recorded it (models/packed.py), rounded to a token
        count (so mass, whose images keep what their score mass needs, is not counted at round(rho N));
        FLOPs count attention at that mean length. Otherwise rho itself."""
        if self.config.allocation == "fixed" or rho >= 1.0:
            return rho, None
        mean = float(self.model.packed_input_tokens)
        count = min(self.num_tokens, max(self.model.num_prefix_tokens + 1, round(mean)))
        return count / self.num_tokens, mean

    def packed_key_shares(self) -> Optional[Dict[int, dict]]:
        """The time summary of a packed run by the token counts its steps kept: the schedule's share of
        rates below 1 spread over the counts the packed steps were timed at, in proportion to their
        timed steps (its rate 1 share stays at N). None for a dense run or before any packed step."""
        if self.config.allocation == "fixed":
            return None
        observed = {key: count for key, count in self.times.count.items() if key != self.num_tokens}
        if not observed:
            return None
        steps = sum(observed.values())
        groups: Dict[int, dict] = {}
        for rate, share in self.schedule.shares().items():
            targets = {self.num_tokens: 1.0} if rate >= 1.0 else {key: n / steps for key, n in observed.items()}
            for key, fraction in targets.items():
                group = groups.setdefault(key, {"share": 0.0, "keep_rates": []})
                group["share"] += share * fraction
                group["keep_rates"].append(rate)
        return groups

    def cost_key(self, rho: float):
        """The step's cost key (train/methods/cost.py): the kept-token count, or with methods that
        change the cost a CostKey of their settings now."""
        if not self.hooks:
            return num_kept_tokens(self.num_tokens, rho) if rho < 1.0 else self.num_tokens
        return step_key(self.num_tokens, rho, self.hooks)

    def count_flops(self, key, rho: float, values: Optional[Dict[str, float]] = None):
        """FLOPs of an iteration at `key`: the methods' settings now, or `values` (a key_settings
        entry: the settings each hook reads, e.g. token_keep_rate, stage)."""
        if values is None:
            values = {name: value for hook in self.hooks for name, value in hook.current_values().items()}

        def prepare(twin):
            for hook in self.hooks:
                hook.apply_values(twin, values)
        return self.flops(key, rho, prepare=prepare)

    PROBE_ROUNDS = 3

    def _probe_baseline_iteration(self, batch) -> Optional[float]:
        """An iteration time at rho = 1 for a run that timed exactly one token count and not N (a
        fixed:R run): its measured time plus (forward + backward at rho = 1) - (forward + backward
        at R), both timed on `batch` with the plain model after training (the data, optimizer and
        EMA parts of an iteration do not depend on rho). No weight, gradient or RNG state changes.
        None when it does not apply or rho = 1 does not fit in memory."""
        timed = list(self.times.count)
        if batch is None or self.hooks or len(timed) != 1 or timed[0] == self.num_tokens:
            return None
        rate = next((r for r in self.schedule.shares() if self.times.tokens(r) == timed[0]), None)
        if rate is None:
            return None
        images, labels = batch
        model, was_training, rng = self.model, self.model.training, capture_rng_state()
        seconds = {rate: [], 1.0: []}
        model.train()
        try:
            for round_index in range(self.PROBE_ROUNDS + 1):  # round 0 warms up (allocation, autotuning)
                for keep_rate in seconds:
                    synchronize(self.device)
                    start = time.perf_counter()
                    with autocast_context(self.device, self.autocast_dtype):
                        logits = model(images, keep_rate=keep_rate)
                    self.criterion(logits.float(), labels).backward()
                    synchronize(self.device)
                    if round_index:
                        seconds[keep_rate].append(time.perf_counter() - start)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            restore_rng_state(rng)
        difference = statistics.median(seconds[1.0]) - statistics.median(seconds[rate])
        return self.times.mean(timed[0]) + max(0.0, difference)

    def _finish(self, log: Optional[JsonLinesLog], last_eval: Optional[dict], wall_s: float, last_batch=None) -> dict:
        probed = self._probe_baseline_iteration(last_batch) if self.dist.is_main else None
        key_flops = None
        if self.key_shares is not None:
            full = {name: value for hook in self.hooks for name, value in hook.full_values().items()}
            full["keep_rate"] = 1.0
            key_flops = {key: self.count_flops(key, settings["keep_rate"], settings)
                         for key, settings in [*self.key_settings.items(), (self.num_tokens, full)]}
        timing = projected_time_summary(self.times, self.schedule.shares(), self.total_steps,
                                        baseline_steps=self.config.epochs * self.full_steps_per_epoch,
                                        probed_baseline_s=probed, key_shares=self.key_shares or self.packed_key_shares(),
                                        key_flops=key_flops)
        peak_mb, peak_source = peak_memory_mb(self.device)
        summary = {"type": "end", "step": self.step, "total_steps": self.total_steps,
                   "finished": self.step == self.total_steps, "wall_s": wall_s,
                   "schedule": repr(self.schedule), "mean_keep_rate": self.schedule.mean_keep_rate(),
                   "final_eval": last_eval, "timing": timing, "params_sha256": parameters_sha256(self.model),
                   "recipe": self.config.recipe, "lr_rule": self.lrs.rule,
                   "flops_per_iteration": {str(k): v for k, v in sorted(self.flops.by_tokens.items(),
                                                                        key=lambda kv: str(kv[0]), reverse=True)},
                   "methods": self._methods_summary(),
                   "peak_mem_mb": peak_mb, "peak_mem_source": peak_source,
                   "init_from": None if self.init_report is None else {"path": self.config.init_from,
                                                                      "report": self.init_report}}
        if log is not None:
            log.write(summary)
            log.close()
        if self.dist.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            print(format_summary(timing), flush=True)  # with --no-progress too: it is the run's result
        return summary


    def _methods_summary(self) -> dict:
        """What the method hooks did, for summary.json (None for the registered methods not used)."""
        summary = {method.summary_key: None for method in REGISTRY.values()}
        summary.update({hook.summary_key: hook.summary() for hook in self.hooks})
        summary["lr_schedule"] = self.config.lr_schedule
        return summary


def train(config: TrainConfig, dist_info: DistInfo) -> dict:
    return Trainer(config, dist_info).fit()
