"""The recipes' mechanics: presets and their overrides, layer-wise LR decay, the LR rule, SGD,
repeated augmentation, --init-from, --pool, and a short --recipe deit run that learns and resumes
bit for bit with every augmentation on.

Oracles: the presets as the papers list them (written out here, not read from recipes.py); layer
decay factors decay^(D - i) by hand; SGD's first step by hand; the repeated sampler's per-rank
indices by hand for an unshuffled epoch; the weights loaded by --init-from against the file.
"""
import json
import math
import statistics

import pytest
import torch

from pss_kernels.train import Trainer, TrainConfig, load_checkpoint
from pss_kernels.train.cli import build_parser, parse_config
from pss_kernels.train.config import recipe_config
from pss_kernels.train.distributed import DistInfo, RepeatedAugSampler
from pss_kernels.train.optim import (base_lr, build_lr_scheduler, build_optimizer, layer_decay_scales,
                                     resolve_learning_rates, warmup_cosine_factor)
from pss_kernels.train.trainer import build_model
from pss_kernels.train.data import DataInfo

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
MICRO = dict(model="deit_tiny", embed_dim=16, depth=2, num_heads=2, patch_size=8, data="digits", img_size=16,
             batch_size=32, lr=2e-3, workers=0, progress=False)

RA = "rand-m9-mstd0.5-inc1"
SIMMIM = dict(epochs=100, warmup_epochs=20, lr=1.25e-3, lr_scaling="all", lr_base_batch=512, min_lr=2.5e-7,
              warmup_lr=2.5e-7, weight_decay=0.05, layer_decay=0.65, clip_grad=5.0, label_smoothing=0.1,
              rand_augment=RA, mixup=0.8, cutmix=1.0, random_erasing=0.25, drop_path=0.1, optimizer="adamw")
DEIT = dict(epochs=300, lr=5e-4, lr_scaling="lr", lr_base_batch=512, warmup_epochs=5, min_lr=1e-5, weight_decay=0.05,
            drop_path=0.1, rand_augment=RA, color_jitter=0.3, random_erasing=0.25, mixup=0.8, cutmix=1.0,
            label_smoothing=0.1, repeated_aug=3, ema_decay=0.99996, optimizer="adamw")
PATCHDROPOUT = dict(optimizer="sgd", momentum=0.9, lr=3e-4, weight_decay=1e-4, warmup_epochs=2, label_smoothing=0.1,
                    lr_scaling="none")


@pytest.mark.parametrize("name, expected", [("simmim-finetune", SIMMIM), ("deit", DEIT),
                                            ("patchdropout", PATCHDROPOUT)])
def test_presets_resolve_as_the_papers_list_them(name, expected):
    config = parse_config(["--recipe", name])
    assert config.recipe == name
    assert {key: getattr(config, key) for key in expected} == expected
    assert config == recipe_config(name)  # the Python form resolves the same


def test_flags_given_override_the_preset_wherever_they_stand():
    config = parse_config(["--lr", "1e-3", "--recipe", "deit", "--mixup", "0", "--rand-augment", "none",
                           "--epochs", "3", "--repeated-aug", "1"])
    assert (config.lr, config.mixup, config.rand_augment, config.epochs, config.repeated_aug) == (1e-3, 0.0, None, 3, 1)
    assert (config.cutmix, config.ema_decay, config.lr_scaling) == (1.0, 0.99996, "lr")  # the rest: the preset's
    plain = parse_config([])
    assert plain.recipe is None and plain.rand_augment is None and plain.mixup == 0 and plain.layer_decay == 1.0
    assert recipe_config("simmim-finetune", layer_decay=0.75).layer_decay == 0.75
    with pytest.raises(SystemExit):
        parse_config(["--recipe", "beit"])
    with pytest.raises(SystemExit):
        parse_config(["--rand-augment", "rand-m9-q1"])


def test_help_shows_what_each_preset_sets(capsys):
    text = build_parser().format_help()
    for name in ("simmim-finetune", "deit", "patchdropout"):
        assert f"  {name}: " in text
    assert "--layer-decay 0.65" in text and "--repeated-aug 3" in text and "--optimizer sgd" in text
    with pytest.raises(SystemExit):
        parse_config(["--recipe", "deit", "--help"])
    shown = capsys.readouterr().out
    assert "(default: 0.99996)" in shown and "(default: 300)" in shown  # --help under a recipe shows its values


def test_layer_decay_gives_block_i_decay_to_the_depth_minus_i():
    depth, decay, lr = 3, 0.65, 1e-3
    model = build_model(TrainConfig(**{**MICRO, "depth": depth}), DataInfo(10, 16, (0,) * 3, (1,) * 3))
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.05, layer_decay=decay)
    scale_of = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if name.startswith("blocks."):
            expected = decay ** (depth - int(name.split(".")[1]))
        elif name.startswith(("patch_embed", "cls_token", "pos_embed")):
            expected = decay ** (depth + 1)
        else:  # fc_norm, head
            expected = 1.0
        assert scale_of[id(param)] == pytest.approx(expected), name
        exempt = param.dim() <= 1 or name in ("cls_token", "pos_embed") or name.endswith("bias_table")
        assert decay_of[id(param)] == (0.0 if exempt else 0.05), name
    assert len(scale_of) == sum(1 for _ in model.parameters())
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(lr * group["lr_scale"])
    assert layer_decay_scales(2, 0.5) == [0.125, 0.25, 0.5, 1.0]
    # The LR schedule keeps every group's share: lr x scale x factor, the floor scaled too (BEiT).
    scheduler = build_lr_scheduler(optimizer, lr=lr, min_lr=1e-5, warmup_steps=2, total_steps=10, warmup_lr=1e-4)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-5 * group["lr_scale"])
    assert base_lr(optimizer) == pytest.approx(1e-5)
    without = build_optimizer(model, lr=lr, weight_decay=0.05)
    assert [g["weight_decay"] for g in without.param_groups] == [0.05, 0.0]  # as before: two groups, scale 1


def test_lr_rule_scales_by_the_global_batch_as_each_paper_does():
    deit = resolve_learning_rates(lr=5e-4, min_lr=1e-5, warmup_lr=1e-6, scaling="lr", base_batch=512, global_batch=1024)
    assert (deit.lr, deit.min_lr, deit.warmup_lr) == (1e-3, 1e-5, 1e-6)
    assert "x global batch 1024 / 512" in deit.rule and "lr 0.0005 -> 0.001" in deit.rule
    simmim = resolve_learning_rates(lr=1.25e-3, min_lr=2.5e-7, warmup_lr=2.5e-7, scaling="all", base_batch=512,
                                    global_batch=2048)
    assert (simmim.lr, simmim.min_lr, simmim.warmup_lr) == pytest.approx((5e-3, 1e-6, 1e-6))
    none = resolve_learning_rates(lr=3e-4, min_lr=0.0, warmup_lr=0.0, scaling="none", base_batch=512, global_batch=64)
    assert none.lr == 3e-4 and "no batch scaling" in none.rule
    # Warm-up from warmup_lr: factor w0 + (1 - w0) (t + 1) / T.
    assert warmup_cosine_factor(0, warmup_steps=10, total_steps=20, min_factor=0.0, warmup_factor=0.1) == \
        pytest.approx(0.19)
    assert warmup_cosine_factor(9, warmup_steps=10, total_steps=20, min_factor=0.0, warmup_factor=0.1) == 1.0


def test_the_trainer_applies_the_rule_and_logs_it(tmp_path):
    config = TrainConfig(**{**MICRO, "lr": 1e-3}, out_dir=str(tmp_path), epochs=1, stop_at_step=2, min_lr=1e-4,
                         lr_scaling="all", lr_base_batch=128, warmup_lr=1e-5)
    trainer = Trainer(config, CPU)
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [pytest.approx(2.5e-4)] * 2  # 32 / 128
    trainer.fit()
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert records[0]["type"] == "config" and records[0]["config"]["lr_scaling"] == "all"
    assert (records[0]["lr"], records[0]["min_lr"], records[0]["warmup_lr"]) == pytest.approx((2.5e-4, 2.5e-5, 2.5e-6))
    assert "x global batch 32 / 128" in records[0]["lr_rule"]
    warmup_steps = 44  # one epoch of 1438 // 32 steps
    assert records[1]["lr"] == pytest.approx(2.5e-6 + (2.5e-4 - 2.5e-6) / warmup_steps)


def test_sgd_takes_the_hand_computed_first_step():
    torch.manual_seed(0)
    model = build_model(TrainConfig(**MICRO), DataInfo(10, 16, (0,) * 3, (1,) * 3))
    optimizer = build_optimizer(model, lr=0.1, weight_decay=1e-2, optimizer="sgd", momentum=0.9)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    model(torch.randn(4, 3, 16, 16)).logsumexp(-1).mean().backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    optimizer.step()
    for name, param in model.named_parameters():
        # First step: the momentum buffer is the (L2-decayed) gradient itself.
        expected = before[name] - 0.1 * (grads[name] + decay_of[id(param)] * before[name])
        torch.testing.assert_close(param.detach(), expected, msg=name)


def test_repeated_augmentation_per_rank_indices():
    def indices(world_size, **kwargs):
        samplers = [RepeatedAugSampler(10, rank=r, world_size=world_size, repeats=3, shuffle=False, **kwargs)
                    for r in range(world_size)]
        return [[index for index, _ in sampler] for sampler in samplers]

    # [0,0,0,1,1,1,...,9,9,9], rank r takes positions r, r + W, ...; the first 10 // W of them.
    assert indices(1) == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3]]
    assert indices(2) == [[0, 0, 1, 2, 2], [0, 1, 1, 2, 3]]
    assert indices(4) == [[0, 1], [0, 1], [0, 2], [1, 2]]  # 30 keys padded to 32 with the first two
    sampler = RepeatedAugSampler(10, rank=0, world_size=1, repeats=3, seed=5)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 10
    assert [i for i, _ in keys[:9]] == [keys[0][0]] * 3 + [keys[3][0]] * 3 + [keys[6][0]] * 3  # copies in a row
    assert len({seed for _, seed in keys}) == 10  # every copy its own augmentation
    sampler.set_epoch(2, start=4)
    assert list(sampler) == keys[4:] and len(sampler) == 6  # resume mid-epoch
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != [i for i, _ in keys]
    # Across 2 ranks one epoch covers 10 // 2 * 2 / 3 images, each on both ranks in turn.
    ranks = [RepeatedAugSampler(12, rank=r, world_size=2, repeats=3, seed=1) for r in range(2)]
    shards = [[i for i, _ in s] for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 6 and len(set(shards[0] + shards[1])) == 4


def run_digits_deit(out_dir, **overrides):
    # Every augmentation of the DeiT recipe on (RandAugment, erasing, Mixup/CutMix, repeated
    # augmentation, EMA), a tiny model and a short run: the LR is raised for 4 epochs.
    config = recipe_config("deit", model="deit_tiny", embed_dim=32, depth=2, num_heads=2, patch_size=8, data="digits",
                           img_size=16, batch_size=32, workers=0, progress=False, epochs=4, warmup_epochs=0.5, lr=0.064,
                           eval_every=0, out_dir=str(out_dir), **overrides)
    return Trainer(config, CPU).fit()


def test_deit_recipe_on_digits_trains_and_resumes_bit_for_bit(tmp_path):
    pytest.importorskip("kornia")  # the recipe's device-side augmentation (the train extra)
    straight = run_digits_deit(tmp_path / "straight")
    first = run_digits_deit(tmp_path / "resumed", stop_at_step=61)  # mid-epoch, mid-repetition
    assert first["step"] == 61 and not first["finished"]
    resumed = run_digits_deit(tmp_path / "resumed", resume="auto")
    assert resumed["params_sha256"] == straight["params_sha256"]
    assert resumed["final_eval"] == straight["final_eval"]
    records = [json.loads(line) for line in open(tmp_path / "straight" / "log.jsonl")]
    train = [r for r in records if r["type"] == "train"]
    resumed_train = [json.loads(line) for line in open(tmp_path / "resumed" / "log.jsonl")]
    assert [(r["step"], r["loss"], r["lr"]) for r in train] == [
        (r["step"], r["loss"], r["lr"]) for r in resumed_train if r["type"] == "train"]
    # It learns: the loss falls and the accuracy is far above chance (10 %).
    first_epoch = statistics.mean(r["loss"] for r in train if r["epoch"] == 0)
    last_epoch = statistics.mean(r["loss"] for r in train if r["epoch"] == 3)
    assert last_epoch < first_epoch - 0.05
    final = straight["final_eval"]
    assert final["top1"] > 25.0 and final["loss"] < math.log(10) - 0.1, final
    assert final["top5"] >= final["top1"] and "ema_top5" in final
    # The resolved config is logged and stored; FLOPs once per kept-token count; peak memory.
    assert records[0]["type"] == "config" and records[0]["config"]["recipe"] == "deit"
    assert records[0]["config"]["mixup"] == 0.8 and records[0]["config"]["repeated_aug"] == 3
    saved = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["config"]
    assert saved["recipe"] == "deit" and saved["rand_augment"] == RA and saved["lr"] == 0.064
    flops = {r["tokens"]: r["flops"] for r in train}
    assert len(flops) == 4 and all(len({r["flops"] for r in train if r["tokens"] == k}) == 1 for k in flops)
    assert {int(k): v for k, v in straight["flops_per_iteration"].items()} == flops
    assert flops[5] > flops[4] > flops[3] > flops[2]  # N = 5: rho 1, 0.8, 0.6, 0.4 (0.2 keeps 2 as 0.4 does)
    assert all(r["peak_mem_mb"] > 0 for r in train) and straight["peak_mem_source"] == "cpu peak rss"
    assert straight["recipe"] == "deit" and "lr (min-lr, warmup-lr as given) x global batch 32 / 512" in \
        straight["lr_rule"]


def test_init_from_loads_weights_at_the_start_of_a_fresh_run_only(tmp_path, capsys):
    source = Trainer(TrainConfig(**MICRO, seed=1, out_dir=str(tmp_path / "source"), epochs=1), CPU)
    path = tmp_path / "weights.pth"
    torch.save(source.model.state_dict(), path)
    settings = dict(**MICRO, epochs=1, ema_decay=0.9, init_from=str(path), out_dir=str(tmp_path / "run"))
    trainer = Trainer(TrainConfig(**settings, stop_at_step=2), CPU)
    printed = capsys.readouterr().out
    assert f"--init-from {path}" in printed and "loaded" in printed
    for name, value in source.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
        assert torch.equal(trainer.ema.module.state_dict()[name], value), name  # the EMA starts from them too
    summary = trainer.fit()
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    init = [r for r in records if r["type"] == "init_from"]
    assert len(init) == 1 and init[0]["path"] == str(path) and init[0]["report"] == trainer.init_report
    assert summary["init_from"] == {"path": str(path), "report": trainer.init_report}
    # Resumed: the weights come from the checkpoint; the file is not read again (here: gone).
    path.unlink()
    resumed = Trainer(TrainConfig(**settings, resume="auto"), CPU)
    assert resumed.step == 2 and "--init-from" not in capsys.readouterr().out
    assert resumed.fit()["init_from"]["report"] == trainer.init_report


def test_pool_flag_reaches_the_model():
    assert parse_config(["--pool", "cls"]).pool == "cls" and parse_config([]).pool is None
    info = DataInfo(10, 16, (0,) * 3, (1,) * 3)
    cls = build_model(TrainConfig(**MICRO, pool="cls"), info)
    assert cls.pool == "cls" and isinstance(cls.norm, torch.nn.LayerNorm)
    assert build_model(TrainConfig(**MICRO), info).pool == "mean"
    with pytest.raises(SystemExit):
        parse_config(["--pool", "max"])


def test_a_run_without_augmentation_needs_no_kornia(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "kornia", None)  # `import kornia` now raises ImportError
    trainer = Trainer(TrainConfig(**MICRO, out_dir=str(tmp_path), epochs=1, stop_at_step=1), CPU)
    assert trainer.augment is None and trainer.fit()["step"] == 1
