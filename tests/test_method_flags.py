"""The mechanics of every method flag of pss-train, on CPU with deit_tiny at embed 32, depth 4, img 32,
patch 8 (16 patches): the selectors keep the right tokens at the right step while R_T and R_A follow
the cosine warm-up; growth happens at the solver's stage boundaries with the new parts copied and
their moments reset, the stage in the checkpoint and a resume across a boundary bit for bit; the
FLOPs of each step count pruning and growth; the LR schedules against hand values; PatchDropout's
draws and evaluation at every patch; --scorer center; each flag end to end through pss-train and
pss-evaluate (whose rho = 1 accuracy must be the trainer's: the method state is rebuilt)."""
import json
import math

import numpy as np
import pytest
import torch

from pss_kernels import evaluate as evaluate_cli
from pss_kernels.models import create_model
from pss_kernels.models import growth as growth_module
from pss_kernels.models.flops import count_flops
from pss_kernels.models.growth import GrowthStage, set_stage, stage_flops, stage_keep_rate
from pss_kernels.models.token_pruning import TokenPruning, kept_count
from pss_kernels.ops.sample_patches.module import center_scores
from pss_kernels.schedules import solve_budget
from pss_kernels.train import Trainer, TrainConfig, load_checkpoint
from pss_kernels.train.methods import growth as growth_hooks
from pss_kernels.train.__main__ import main as train_main
from pss_kernels.train.cli import build_parser, parse_config
from pss_kernels.train.methods import derived_stages, growth_stages, scaled_blocks
from pss_kernels.train.optim import warmup_linear_factor, warmup_rex_factor
from test_train import CPU, train_records

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(model="deit_tiny", embed_dim=32, depth=4, num_heads=4, patch_size=8, data="digits", img_size=32,
            batch_size=64, lr=2e-3, workers=0, progress=False, drop_path=0.0, eval_every=0, schedule="none")
STEPS_PER_EPOCH = 1438 // 64  # 22
TINY_FLAGS = ["--model", "deit_tiny", "--embed-dim", "32", "--depth", "4", "--num-heads", "4", "--patch-size", "8",
              "--data", "digits", "--img-size", "32", "--batch-size", "128", "--workers", "0", "--epochs", "2",
              "--lr", "2e-3", "--no-progress", "--eval-every", "0"]


def tiny_config(out_dir, **overrides):
    return TrainConfig(**{**TINY, "out_dir": str(out_dir), **overrides})


def warmup_cosine(step, target, hold, decay, quantum=0.05):
    """The paper's warm-up by hand: 1 for `hold` steps, then a cosine to `target` over `decay` steps,
    on the selector's 0.05 grid."""
    progress = min(1.0, max(0.0, (step - hold) / decay))
    rate = target + (1 - target) * (1 + math.cos(math.pi * progress)) / 2
    return max(target, round(math.floor(round(rate / quantum, 9) + 0.5) * quantum, 10))


# ---- command line ---------------------------------------------------------------------------------
def test_method_flags_parse_with_their_defaults_and_are_in_help(capsys):
    assert parse_config([]).schedule == "cyclic:0.2,1.0"
    # digits (the default data): random sampling, where magnitude fails; any other data: l1 (the paper's)
    assert parse_config([]).scorer == "random" and parse_config(["--data", "synthetic"]).scorer == "l1"
    assert parse_config(["--scorer", "l1"]).scorer == "l1"
    for flags in (["--token-pruning", "tri-level/0.7"], ["--attention-keep", "0.3"], ["--example-keep", "0.9"],
                  ["--budget", "0.5"]):
        assert parse_config(flags).schedule == "none", flags  # a method alone keeps every input token
    assert parse_config(["--budget", "0.5", "--schedule", "fixed:0.6"]).schedule == "fixed:0.6"  # refused at run
    assert parse_config(["--schedule", "patchdropout"]).scorer == "random"
    assert parse_config(["--schedule", "patchdropout", "--scorer", "l1"]).scorer == "l1"
    assert parse_config(["--scorer", "center"]).scorer == "center"
    config = parse_config(["--lr-schedule", "rex", "--growth-init", "random", "--filter-every", "3"])
    assert (config.lr_schedule, config.growth_init, config.filter_every, config.filter_fraction) == ("rex", "random",
                                                                                                   3, 0.05)
    with pytest.raises(SystemExit):
        parse_config(["--token-pruning", "half"])
    assert "--token-pruning" in capsys.readouterr().err
    text = build_parser().format_help()
    for flag in ("--token-pruning", "--attention-keep", "--pruning-placement", "--pruning-warmup", "--example-keep",
                 "--filter-every", "--filter-fraction", "--filter-iterations", "--budget", "--growth",
                 "--growth-init", "--budget-seeds", "--lr-schedule", "center", "patchdropout:0.5,1.0,grid_step=0.5"):
        assert flag in text, flag


def hook_named(trainer, name):
    """The trainer's hook of method `name` (the trainer itself never names one)."""
    return next(hook for hook in trainer.hooks if hook.name == name)


def test_paper_settings_are_the_defaults():
    from pss_kernels.train.methods import parse_token_pruning
    assert scaled_blocks(12) == (4, 7, 10) and scaled_blocks(4) == (2, 3, 4) and scaled_blocks(6) == (2, 4, 5)
    assert parse_token_pruning("tri-level/0.8") == (0.8, 1.0, None, "after_attention")
    assert parse_token_pruning("attention/0.3")[:2] == (1.0, 0.3)
    assert parse_token_pruning("0.7,3,5") == (0.7, None, (3, 5), None)
    config = TrainConfig()
    assert (config.filter_every, config.filter_fraction, config.growth, config.growth_init) == (
        30, 0.05, "heads,mlp,tokens", "copy")
    with torch.device("meta"):
        small = create_model("deit_small")
        tiny = create_model("deit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4)
    assert growth_stages("heads,mlp,tokens", "deit_small", small) == (
        GrowthStage(2, 1.0, 100), GrowthStage(4, 2.0, 144), GrowthStage(6, 4.0, 196))  # Table 6
    assert growth_stages("heads,mlp,tokens", "deit_tiny", tiny) == derived_stages(4, 4.0, 16) == (
        GrowthStage(1, 1.0, 8), GrowthStage(3, 2.0, 12), GrowthStage(4, 4.0, 16))
    assert growth_stages("tokens", "deit_small", small) == (
        GrowthStage(6, 4.0, 100), GrowthStage(6, 4.0, 144), GrowthStage(6, 4.0, 196))
    assert growth_stages("heads,mlp", "deit_small", small)[0] == GrowthStage(2, 1.0, None)
    assert growth_stages("2:1:100/6:4:all", "deit_small", small) == (GrowthStage(2, 1.0, 100),
                                                                      GrowthStage(6, 4.0, 196))
    with pytest.raises(ValueError, match="the last stage must be the full model"):
        growth_stages("2:1:100/4:2:144", "deit_small", small)
    with pytest.raises(ValueError, match="--growth must name"):
        growth_stages("width", "deit_small", small)


# ---- Tri-Level token and attention levels ----------------------------------------------------------
def test_selectors_keep_the_top_tokens_at_the_warmup_rate_of_each_step(tmp_path, monkeypatch):
    selections = []
    real_select = TokenPruning.select

    def spy(self, x, index, key_mask, cls_attention, attention_map):
        out = real_select(self, x, index, key_mask, cls_attention, attention_map)
        if x.device.type == "meta" or not torch.is_grad_enabled():
            return out  # the FLOP count's twin, the evaluation
        selections.append((self.token_keep_rate, self.attention_keep_rate, x.shape[1], index, cls_attention, out))
        return out

    monkeypatch.setattr(TokenPruning, "select", spy)
    # Hold 1 epoch at 1, cosine to the targets over 2 epochs, then the targets (R_T 0.5, R_A 0.5).
    config = tiny_config(tmp_path, epochs=4, token_pruning="0.5,2,3", attention_keep=0.5, pruning_warmup="1,2")
    trainer = Trainer(config, CPU)
    assert trainer.model.token_pruning.blocks == (2, 3) and trainer.model.token_pruning.placement == "after_attention"
    summary = trainer.fit()
    records = train_records(tmp_path / "log.jsonl")
    hold, decay = STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH
    for record in records:
        step = record["step"]
        assert record["token_keep_rate"] == warmup_cosine(step, 0.5, hold, decay), step
        assert record["attention_keep_rate"] == warmup_cosine(step, 0.5, hold, decay), step
    # The selectors ran only where a rate is below 1 (two per step), keeping ceil(q(R_T) P) patches.
    pruned = [r for r in records if r["token_keep_rate"] < 1 or r["attention_keep_rate"] < 1]
    assert len(selections) == 2 * len(pruned) and all(r["step"] > hold for r in pruned)
    for record, (first, second) in zip(pruned, zip(selections[::2], selections[1::2])):
        rate = record["token_keep_rate"]
        after_first, after_second = kept_count(16, rate), kept_count(kept_count(16, rate), rate)
        assert (first[0], first[2], first[5][0].shape[1]) == (rate, 17, 1 + after_first)
        assert (second[2], second[5][0].shape[1]) == (1 + after_first, 1 + after_second)
        key = f"17>{1 + after_first}>{1 + after_second}" if rate < 1 else "17>17>17"
        assert record["key"].split(" ")[0] == key and record["key"].endswith(
            f" a{record['attention_keep_rate']:g}" if record["attention_keep_rate"] < 1 else key)
    # Which tokens: the top patch tokens by the head-averaged CLS attention, with their full positions.
    for _, _, _, index_in, cls_attention, (x_out, index_out, key_mask) in selections[-2:]:
        kept = index_out.shape[1] - 1
        top = torch.topk(cls_attention[:, 1:], kept, dim=1).indices + 1  # among the tokens entering
        positions = top if index_in is None else index_in.gather(1, top)  # block 2 sees every token
        assert all(set(index_out[b, 1:].tolist()) == set(positions[b].tolist()) for b in range(len(top)))
    assert selections[-2][3] is None and key_mask.shape == (len(top), kept + 1, kept + 1)
    assert key_mask[:, 1:, 1:].sum(-1).unique().tolist() == [kept_count(kept, 0.5)]  # R_A of the kept keys
    # Evaluation runs the model at the rates it ended with, as the paper reports the pruned model.
    assert trainer.model.token_keep_rate == 0.5 and summary["methods"]["token_pruning"]["token_keep_rate"] == 0.5
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["methods"]["pruning"]["token_keep_rate"] == 0.5


def test_flops_of_each_step_count_pruning(tmp_path):
    config = tiny_config(tmp_path, epochs=2, token_pruning="0.5,2,3", pruning_warmup="0,1")
    summary = Trainer(config, CPU).fit()
    records = train_records(tmp_path / "log.jsonl")
    twin = create_model("deit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=10,
                        token_pruning=TokenPruning((2, 3), placement="after_attention"))
    by_key = {}
    for record in records:
        by_key.setdefault(record["key"], set()).add(record["flops"])
    assert all(len(values) == 1 for values in by_key.values())
    for record in (records[0], records[-1]):
        twin.token_keep_rate = record["token_keep_rate"]
        assert record["flops"] == count_flops(twin, batch_size=64, backward=True)
    assert records[-1]["flops"] < 0.7 * records[0]["flops"]  # 17 -> 9 -> 5 tokens after the warm-up
    assert set(summary["flops_per_iteration"]) == {str(key) for key in by_key}
    # The time summary is keyed by the tokens of the input sampler and the selectors.
    assert set(summary["timing"]["per_tokens"]) == {str(key) for key in by_key}
    assert summary["timing"]["per_tokens"]["17>9>5"]["source"] == "measured"


# ---- Budgeted Training ---------------------------------------------------------------------------
def test_growth_at_the_solver_boundaries_with_copied_parts_and_reset_moments(tmp_path, monkeypatch):
    events = []
    real_grow, real_reset = growth_module.grow, growth_module.reset_optimizer_moments

    def grow_spy(model, stage, **options):
        slices = real_grow(model, stage, **options)
        events.append({"stage": stage, "model": model})
        return slices

    def reset_spy(optimizer, slices):
        touched = real_reset(optimizer, slices)
        for piece in slices:  # the new parts' moments are zero right after the reset
            state = optimizer.state[piece.param]
            assert not piece.view(state["exp_avg"]).any() and not piece.view(state["exp_avg_sq"]).any()
        events[-1]["reset"] = (touched, len(slices))
        return touched

    monkeypatch.setattr(growth_hooks, "grow", grow_spy)
    monkeypatch.setattr(growth_hooks, "reset_optimizer_moments", reset_spy)
    trainer = Trainer(tiny_config(tmp_path / "straight", epochs=4, budget=0.5, ema_decay=0.9), CPU)
    stages = derived_stages(4, 4.0, 16)
    growth = hook_named(trainer, "growth")
    assert growth.stages == stages
    # Stage lengths: solve_budget over the per-stage forward FLOPs of the real model, alpha 2.
    expected = solve_budget(0.5, dict(zip((1 / 3, 2 / 3, 1.0), stage_flops(trainer.model, stages))), (1 / 3, 2 / 3, 1.0),
                            2.0, total_steps=4 * STEPS_PER_EPOCH, steps_per_epoch=STEPS_PER_EPOCH,
                            seeds=(9 / 17, 13 / 17, 1.0))
    steps = trainer.schedule.stage_steps
    assert steps == expected.stage_steps and trainer.total_steps == sum(steps)
    spent = sum(f * s for f, s in zip(growth.stage_flops, steps)) / (4 * STEPS_PER_EPOCH * growth.stage_flops[-1])
    assert abs(spent - 0.5) < 0.03
    summary = trainer.fit()
    records = train_records(tmp_path / "straight" / "log.jsonl")
    boundaries = np.cumsum(steps)
    assert [r["stage"] for r in records] == [int(np.searchsorted(boundaries, r["step"], side="right"))
                                             for r in records]
    assert [r["tokens"] for r in records] == [(9, 13, 17)[r["stage"]] for r in records]
    model_events = [e for e in events if e["model"] is trainer.model]
    assert [e["stage"] for e in model_events] == list(stages[1:]) and len(events) == 4  # the EMA grew too
    assert all(e["reset"][0] > 0 for e in model_events)
    flops = {r["stage"]: r["flops"] for r in records}
    assert flops[0] < flops[1] < flops[2]
    twin = create_model("deit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=10)
    for stage in range(3):
        set_stage(twin, stages[stage])
        assert flops[stage] == count_flops(twin, batch_size=64, keep_rate=stage_keep_rate(twin, stages[stage]),
                                           backward=True), stage
    state = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["methods"]["growth"]
    assert state["stage"] == 2 and summary["methods"]["growth"]["stage_steps"] == list(steps)


def test_grow_copies_the_active_weights_at_the_boundary(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=4, budget=0.5), CPU)
    boundary = trainer.schedule.stage_steps[0]
    trainer.config.stop_at_step = boundary
    trainer.fit()
    attn = trainer.model.blocks[0].attn
    head0 = attn.qkv.weight.detach().view(3, 4, 8, 32)[:, 0].clone()
    assert attn.active_heads == 1
    state_before = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                    for p, s in trainer.optimizer.state.items()}
    hook_named(trainer, "growth").before_step(boundary)
    assert attn.active_heads == 3 and trainer.model.blocks[0].mlp.active_hidden == 64
    qkv = attn.qkv.weight.detach().view(3, 4, 8, 32)
    assert torch.equal(qkv[:, 1], head0) and torch.equal(qkv[:, 2], head0)
    fc1 = trainer.model.blocks[0].mlp.fc1.weight.detach()
    assert torch.equal(fc1[32:64], fc1[:32])
    moments = trainer.optimizer.state[attn.qkv.weight]
    assert not moments["exp_avg"].view(3, 4, 8, 32)[:, 1:3].any()
    assert torch.equal(moments["exp_avg"].view(3, 4, 8, 32)[:, 0],
                       state_before[id(attn.qkv.weight)]["exp_avg"].view(3, 4, 8, 32)[:, 0])  # old parts keep theirs


def test_budget_resumes_bit_for_bit_across_a_stage_boundary(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "straight", epochs=4, budget=0.5, ema_decay=0.9), CPU)
    boundary = straight.schedule.stage_steps[0]
    end = straight.fit()
    first = Trainer(tiny_config(tmp_path / "resumed", epochs=4, budget=0.5, ema_decay=0.9,
                                stop_at_step=boundary), CPU).fit()
    state = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert first["step"] == boundary and state["methods"]["growth"]["stage"] == 0  # growth is the next step's
    resumed = Trainer(tiny_config(tmp_path / "resumed", epochs=4, budget=0.5, ema_decay=0.9, resume="auto"), CPU)
    assert hook_named(resumed, "growth").stage == 0 and resumed.model.blocks[0].attn.active_heads == 1
    finish = resumed.fit()
    assert finish["params_sha256"] == end["params_sha256"] and finish["final_eval"] == end["final_eval"]
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("straight", "resumed"))
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert a["methods"] == b["methods"]
    with pytest.raises(ValueError, match="does not combine with --schedule"):
        Trainer(tiny_config(tmp_path / "bad", budget=0.5, schedule="fixed:0.6"), CPU)


# ---- LR schedules -------------------------------------------------------------------------------
def test_linear_and_rex_lr_against_hand_values(tmp_path):
    options = dict(warmup_steps=2, total_steps=12, warmup_factor=0.0)
    assert [warmup_linear_factor(t, **options) for t in (0, 1, 2, 7, 11, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.1, 0.0])
    rex = [warmup_rex_factor(t, **options) for t in (2, 7, 11, 12)]
    assert rex == pytest.approx([1.0, 0.5 / 0.75, 0.1 / 0.55, 0.0])  # (1 - p) / (1/2 + (1 - p)/2)
    summaries = {}
    for shape in ("linear", "rex"):
        config = tiny_config(tmp_path / shape, epochs=1, schedule="none", lr_schedule=shape, warmup_epochs=0.0)
        summaries[shape] = Trainer(config, CPU).fit()
        lrs = [r["lr"] for r in train_records(tmp_path / shape / "log.jsonl")]
        total = STEPS_PER_EPOCH
        for step, lr in enumerate(lrs):
            remaining = 1 - step / total
            expected = 2e-3 * (remaining if shape == "linear" else remaining / (0.5 + 0.5 * remaining))
            assert lr == pytest.approx(expected, rel=1e-12), (shape, step)
    assert summaries["linear"]["methods"]["lr_schedule"] == "linear"


# ---- PatchDropout and the centre scorer ------------------------------------------------------------
@pytest.mark.parametrize("spec", ["patchdropout", "patchdropout:0.5,1.0,grid_step=0.5"])
def test_patchdropout_draws_and_evaluates_at_every_patch(tmp_path, monkeypatch, spec):
    model_tokens = []
    from pss_kernels.models.vit import VisionTransformer
    real = VisionTransformer.forward_features

    def spy(self, images, keep_rate=None):
        tokens, index = real(self, images, keep_rate)
        if not self.training and images.device.type != "meta":  # evaluation, not the FLOP counter's twin
            model_tokens.append((tokens.shape[1], index))
        return tokens, index

    monkeypatch.setattr(VisionTransformer, "forward_features", spy)
    config = parse_config(TINY_FLAGS + ["--schedule", spec, "--out-dir", str(tmp_path)])
    assert config.scorer == "random"
    summary = Trainer(config, CPU).fit()
    rates = [r["rho"] for r in train_records(tmp_path / "log.jsonl")]
    assert min(rates) >= 0.5 and max(rates) <= 1.0
    if "grid_step" in spec:
        assert set(rates) == {0.5, 1.0}
    else:
        assert len(set(rates)) == len(rates)  # continuous: every step its own rate
    assert summary["final_eval"]["keep_rate"] == 1.0
    assert model_tokens and all(n == 17 and index is None for n, index in model_tokens)  # all patches


def test_center_scorer_keeps_the_middle_patches(tmp_path):
    config = parse_config(TINY_FLAGS + ["--scorer", "center", "--schedule", "fixed:0.5", "--out-dir", str(tmp_path)])
    trainer = Trainer(config, CPU)
    assert trainer.model.sampler.scorer == "center"
    _, index = trainer.model.forward_features(torch.randn(2, 3, 32, 32), keep_rate=0.5)
    kept = index.shape[1] - 1
    # The centre 2 x 2, then the nearest ring's patches, ties to the lower position (sample_patches').
    centre = torch.sort(center_scores((4, 4), 1, "cpu")[0], descending=True, stable=True).indices[:kept] + 1
    assert {6, 7, 10, 11} <= set(centre.tolist())
    assert set(index[0, 1:].tolist()) == set(index[1, 1:].tolist()) == set(centre.tolist())


# ---- every flag end to end ---------------------------------------------------------------------------
END_TO_END = {
    "patchdropout": ["--schedule", "patchdropout"],
    "patchdropout-grid": ["--schedule", "patchdropout:0.5,1.0,grid_step=0.5"],
    "tri-level-token": ["--token-pruning", "tri-level/0.7"],
    "tri-level-attention": ["--attention-keep", "0.3"],
    "tri-level-example": ["--example-keep", "0.9", "--filter-every", "1"],
    "tri-level-all": ["--token-pruning", "0.8", "--attention-keep", "0.3", "--example-keep", "0.8",
                      "--filter-every", "1", "--pruning-placement", "before_block"],
    "budgeted": ["--budget", "0.5"],
    "budgeted-heads-mlp-random": ["--budget", "0.75", "--growth", "heads,mlp", "--growth-init", "random",
                                  "--budget-seeds", "sample"],
    "lr-linear": ["--schedule", "none", "--lr-schedule", "linear"],
    "lr-rex": ["--lr-schedule", "rex"],
    "center": ["--scorer", "center", "--schedule", "fixed:0.5"],
}


@pytest.mark.parametrize("name", list(END_TO_END))
def test_each_method_flag_trains_and_evaluates_end_to_end(tmp_path, name, capsys):
    pytest.importorskip("matplotlib")
    assert train_main(TINY_FLAGS + END_TO_END[name] + ["--out-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] and "saving vs baseline" in capsys.readouterr().out
    assert all(v is not None for v in summary["flops_per_iteration"].values())
    assert evaluate_cli.main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--keep-rates", "1.0,0.5",
                              "--num-pictures", "0", "--workers", "0"]) == 0
    sweep = json.loads((tmp_path / "eval" / "sweep.json").read_text())["results"]
    # pss-evaluate rebuilt the model as it trained (R_T / R_A, the last growth stage): the same top-1.
    assert sweep[0]["keep_rate"] == 1.0 and sweep[0]["top1"] == summary["final_eval"]["top1"]


def test_digits_run_with_magnitude_sampling_says_why_it_fails(tmp_path, capsys):
    """On digits the command line defaults to random sampling; asking for l1 there gets a note."""
    flags = TINY_FLAGS + ["--epochs", "1", "--stop-at-step", "1", "--schedule", "fixed:0.5", "--out-dir",
                          str(tmp_path)]
    assert train_main(flags + ["--scorer", "l1"]) == 0
    assert "magnitude (l1) sampling fails on digits" in capsys.readouterr().err
    assert train_main(flags + ["--out-dir", str(tmp_path / "random")]) == 0
    assert "sampling fails on digits" not in capsys.readouterr().err
