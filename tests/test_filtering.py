"""Tri-Level E-ViT's example level (pss_kernels/train/methods/example_filter.py): forgetting events and the CLS
attention variance counted against a hand example, the ranking and remove-and-restore moving the
right examples, the paper's rounds (30, 60, 90 for 10 % removed; to 150 for 20 %), the subset
identical on two gloo ranks and after a resume, bit for bit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pss_kernels.models import create_model
from pss_kernels.train import Trainer, load_checkpoint
from pss_kernels.train.distributed import DistInfo
from pss_kernels.train.methods.example_filter import NEVER_LEARNED, ClsAttentionCapture, ExampleFilter
from test_train import CPU, micro_config, train_records

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def observe(example_filter, rows):
    """rows: (index, correct, variance) observations of one step."""
    indices, correct, variance = zip(*rows)
    example_filter.observe(torch.tensor(indices), torch.tensor(correct), torch.tensor(variance, dtype=torch.float32))


def test_forgetting_events_and_variance_against_a_hand_example():
    f = ExampleFilter(6, keep=0.5, fraction=0.3)
    # Epoch 1: 0 T, 1 T, 2 F, 3 F, 4 T; 5 not presented.
    observe(f, [(0, True, 0.1), (1, True, 0.2), (2, False, 0.3)])
    observe(f, [(3, False, 0.4), (4, True, 0.5)])
    f.finish_epoch()
    # Epoch 2: 0 F, 1 T, 2 T, 3 F, 4 twice (T, F: not every presentation right), 5 T.
    observe(f, [(0, False, 0.15), (1, True, 0.25), (2, True, 0.35), (4, True, 0.6)])
    observe(f, [(3, False, 0.45), (4, False, 0.4), (5, True, 0.05)])
    f.finish_epoch()
    # Epoch 3: 0 T, 1 F, 2 F, 3 F, 5 T; 4 not presented.
    observe(f, [(0, True, 0.12), (1, False, 0.22), (2, False, 0.32), (3, False, 0.42), (5, True, 0.07)])
    f.finish_epoch()
    # By hand: 0 T F T -> 1 event (epoch 2); 1 T T F -> 1; 2 F T F -> 1; 3 F F F -> 0, never learned;
    # 4 T (T,F) - -> 1; 5 - T T -> 0.
    assert f.forgetting.tolist() == [1, 1, 1, 0, 1, 0]
    assert f.learned.tolist() == [True, True, True, False, True, True]
    assert f.last_correct.tolist() == [True, False, False, False, False, True]
    assert f.presentations.tolist() == [3, 3, 3, 3, 3, 2]
    # The variance of the last epoch an example was presented in (the mean of its presentations).
    expected = torch.tensor([0.12, 0.22, 0.32, 0.42, 0.5, 0.07], dtype=torch.float32).double()
    expected[4] = (torch.tensor(0.6, dtype=torch.float32).double() + torch.tensor(0.4, dtype=torch.float32).double()) / 2
    torch.testing.assert_close(f.variance, expected, rtol=0, atol=1e-11)
    assert not f.epoch_seen.any() and not f.epoch_correct.any() and not f.epoch_variance.any()


def test_ranking_and_remove_and_restore_move_the_right_examples():
    f = ExampleFilter(10, keep=0.6, fraction=0.2)
    assert (f.kept, f.moved) == (6, 2)
    f.active = torch.tensor([True] * 6 + [False] * 4)
    f._subset = None
    f.forgetting = torch.tensor([2, 0, 1, 0, 0, 5, 0, 0, 0, 0])
    f.learned = torch.tensor([True, True, True, False, True, True, False, False, False, False])
    f.variance = torch.tensor([0.1, 0.3, 0.2, 0.0, 0.2, 0.0, 0, 0, 0, 0], dtype=torch.float64)
    # Fewest events first (3 never learned: last), ties by lower variance: 4 (0.2) before 1 (0.3).
    assert f.ranking().tolist() == [4, 1, 2, 0, 5, 3]
    removed, restored = f.remove_and_restore(epoch=30)
    assert removed == [1, 4]
    assert len(restored) == 2 and set(restored) <= {6, 7, 8, 9}
    assert f.subset() == sorted({0, 2, 3, 5} | set(restored)) and int(f.active.sum()) == 6
    # The same draw in a second filter with the same seed (a deterministic rule for every rank).
    twin = ExampleFilter(10, keep=0.6, fraction=0.2)
    twin.active, twin.forgetting, twin.learned, twin.variance = (f.active.clone(), f.forgetting, f.learned,
                                                                 f.variance)
    twin.active = torch.tensor([True] * 6 + [False] * 4)
    assert twin.remove_and_restore(epoch=30) == (removed, restored)
    assert f.history == [{"epoch": 30, "removed": [1, 4], "restored": restored}]


@pytest.mark.parametrize("keep, rounds", [(0.9, [30, 60, 90]), (0.8, [30, 60, 90, 120, 150])])
def test_rounds_every_30_epochs_as_the_paper_iterates(keep, rounds):
    f = ExampleFilter(200, keep=keep, period=30, fraction=0.05, last_epoch=300)
    assert f.kept == round(200 * keep) and f.moved == 10
    events = [f.end_epoch(epoch) for epoch in range(1, 301)]
    assert [e["epoch"] for e in events if e is not None] == rounds
    assert f.end_epoch(300) is None  # once per epoch, also across a resume
    assert int(f.active.sum()) == f.kept  # the subset keeps its size


def test_initial_subset_is_a_seeded_random_draw_of_r_e():
    a, b, c = ExampleFilter(100, keep=0.7, seed=1), ExampleFilter(100, keep=0.7, seed=1), ExampleFilter(100, keep=0.7)
    assert len(a.subset()) == 70 and a.subset() == b.subset() != c.subset()
    assert a.subset() != list(range(70))


def test_cls_attention_capture_gives_the_last_block_variance_and_leaves_the_output():
    torch.manual_seed(0)
    model = create_model("deit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5,
                         drop_path_rate=0.0).train()
    images = torch.randn(3, 3, 32, 32)
    plain = model(images)
    inputs = []
    model.blocks[-1].attn.register_forward_pre_hook(lambda module, args: inputs.append(args))
    capture = ClsAttentionCapture(model)
    torch.testing.assert_close(model(images), plain, rtol=0, atol=0)
    variance = capture.take()
    x, index = inputs[-1]
    with torch.no_grad():
        _, cls_attention, _ = model.blocks[-1].attn(x, index, stats="cls")
    torch.testing.assert_close(variance, cls_attention[:, 1:].var(dim=1, unbiased=False))
    capture.take()  # the call above went through the hooks too
    model.eval()
    model(images)
    assert capture.take() is None  # evaluation records nothing


FILTER = dict(example_keep=0.8, filter_every=1, filter_fraction=0.1, epochs=3, schedule="cyclic:0.2,1.0")


def example_filter(trainer) -> ExampleFilter:
    """The run's ExampleFilter, held by the example-level hook (the trainer names no method)."""
    return next(hook for hook in trainer.hooks if hook.name == "filtering").filter


def test_trainer_counts_every_presented_example_and_resumes_bit_for_bit(tmp_path):
    straight = Trainer(micro_config(tmp_path / "straight", **FILTER), CPU)
    kept = example_filter(straight).kept
    assert kept == round(0.8 * 1438) and straight.steps_per_epoch == kept // 32
    summary = straight.fit()
    f = example_filter(straight)
    # Every step's 32 examples were counted, and only examples of the subset of their epoch.
    assert int(f.presentations.sum()) == summary["step"] * 32
    assert [r["epoch"] for r in summary["methods"]["filtering"]["rounds"]] == [1, 2]  # none after the last
    first = Trainer(micro_config(tmp_path / "resumed", stop_at_step=50, **FILTER), CPU).fit()  # mid-epoch 2
    assert first["step"] == 50
    resumed = Trainer(micro_config(tmp_path / "resumed", resume="auto", **FILTER), CPU)
    assert example_filter(resumed).iterations_done == 1 and example_filter(resumed).epoch_seen.sum() > 0
    end = resumed.fit()
    assert end["params_sha256"] == summary["params_sha256"] and end["final_eval"] == summary["final_eval"]
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt")["methods"]["filtering"] for run in ("straight", "resumed"))
    assert a["history"] == b["history"]
    for name in ExampleFilter.TENSORS:
        assert torch.equal(a[name], b[name]), name
    straight_log = [(r["step"], r["loss"]) for r in train_records(tmp_path / "straight" / "log.jsonl")]
    assert straight_log == [(r["step"], r["loss"]) for r in train_records(tmp_path / "resumed" / "log.jsonl")]


def test_the_subset_is_the_same_on_two_gloo_ranks(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pss_kernels.train", "--model", "deit_tiny", "--embed-dim", "16", "--depth", "2",
               "--num-heads", "2", "--patch-size", "8", "--data", "digits", "--img-size", "16", "--epochs", "3",
               "--batch-size", "16", "--example-keep", "0.8", "--filter-every", "1", "--filter-fraction", "0.1",
               "--workers", "0", "--device", "cpu", "--out-dir", str(tmp_path), "--log-all-ranks", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [[json.loads(line) for line in open(tmp_path / name)] for name in ("log.jsonl", "log.rank1.jsonl")]
    events = [[r for r in log if r["type"] == "filter"] for log in logs]
    assert [e["epoch"] for e in events[0]] == [1, 2] and events[0] == events[1]  # digests of the subset included
    assert logs[0][-1]["params_sha256"] == logs[1][-1]["params_sha256"]
    state = load_checkpoint(tmp_path / "checkpoint.pt")["methods"]["filtering"]
    assert int(state["active"].sum()) == round(0.8 * 1438)
    # Both ranks' examples were counted on each rank: 3 epochs x 2 ranks x 35 steps x 16 images.
    assert int(state["presentations"].sum()) == 3 * 2 * (round(0.8 * 1438) // 2 // 16) * 16


def test_an_epoch_without_the_example_keeps_its_last_state_for_the_next_comparison():
    # Epochs 1-4 (blank: not presented, as an example out of the subset):
    #   0: T  -  F  -   -> 1 event (correct in its last presented epoch, wrong in the next one)
    #   1: F  -  T  -   -> 0 events, learned
    #   2: T  -  -  F   -> 1 event, across two absent epochs
    #   3: T  -  T  T   -> 0 events
    #   4: -  T  -  -   -> 0 events, learned, last state correct
    #   5: -  -  -  -   -> never presented: never learned, no events
    f = ExampleFilter(6, keep=0.5, fraction=0.3)
    observe(f, [(0, True, 0.13), (1, False, 0.21), (2, True, 0.37), (3, True, 0.41)])
    f.finish_epoch()
    observe(f, [(4, True, 0.29)])
    f.finish_epoch()
    assert f.last_correct.tolist() == [True, False, True, True, True, False]  # the absent kept epoch 1's state
    assert f.variance[:4].tolist() == pytest.approx([0.13, 0.21, 0.37, 0.41], abs=1e-7)
    observe(f, [(0, False, 0.17), (1, True, 0.23), (3, True, 0.43)])
    f.finish_epoch()
    observe(f, [(2, False, 0.31), (3, True, 0.47)])
    f.finish_epoch()
    assert f.forgetting.tolist() == [1, 0, 1, 0, 0, 0]
    assert f.learned.tolist() == [True, True, True, True, True, False]
    assert f.last_correct.tolist() == [False, True, False, True, True, False]
    assert f.presentations.tolist() == [2, 2, 2, 3, 1, 0]
    # The ranking: fewest events, then variance (of the last presented epoch), never learned last.
    f.active[:] = True
    assert f.ranking().tolist() == [1, 4, 3, 0, 2, 5]  # 0.23, 0.29, 0.47 | 0.17, 0.31 | never


def test_end_epoch_folds_every_epoch_and_skips_an_epoch_it_has_done():
    f = ExampleFilter(6, keep=0.5, fraction=0.3, period=4)
    observe(f, [(0, True, 0.1)])
    assert f.end_epoch(1) is None and f.presentations[0] == 1
    observe(f, [(0, False, 0.1)])
    assert f.end_epoch(1) is None  # epoch 1 again (a resume): nothing folded ...
    assert f.presentations[0] == 1 and f.forgetting[0] == 0 and f.epoch_seen[0] == 1  # ... the count waits
    assert f.end_epoch(2) is None and f.forgetting[0] == 1 and f.presentations[0] == 2


def test_rounds_stop_before_the_last_epoch_and_after_the_set_iterations():
    # Period 3 over 10 epochs: rounds at 3, 6, 9 (9 < 10); with last_epoch 9 the round at 9 would train
    # on nothing; iterations=2 stops after the second round whatever the default (round(0.3/0.1)+1 = 4).
    rounds = lambda f: [e["epoch"] for e in map(f.end_epoch, range(1, 11)) if e is not None]  # noqa: E731
    assert rounds(ExampleFilter(40, keep=0.7, period=3, fraction=0.1, last_epoch=10)) == [3, 6, 9]
    assert rounds(ExampleFilter(40, keep=0.7, period=3, fraction=0.1, last_epoch=9)) == [3, 6]
    assert rounds(ExampleFilter(40, keep=0.7, period=3, fraction=0.1, iterations=2)) == [3, 6]
    assert ExampleFilter(40, keep=0.7, period=3, fraction=0.1).iterations == 4


def test_subset_and_move_sizes_round_and_cap():
    # 7 examples, keep 0.5: round(3.5) = 4 kept (Python rounds half to even: 4); fraction 0.6 would move
    # round(4.2) = 4, capped at the 3 examples outside the subset.
    f = ExampleFilter(7, keep=0.5, fraction=0.6)
    assert (f.kept, f.moved, int(f.active.sum())) == (4, 3, 4)
    tiny = ExampleFilter(3, keep=0.1, fraction=0.3)  # round(0.3) = 0: at least one example is kept
    assert (tiny.kept, tiny.moved, int(tiny.active.sum())) == (1, 1, 1)
    # 13 examples, keep 0.77: round(10.01) = 10; fraction 0.115: round(1.495) = 1.
    assert (ExampleFilter(13, keep=0.77, fraction=0.115).kept, ExampleFilter(13, keep=0.77, fraction=0.115).moved) \
        == (10, 1)


@pytest.mark.parametrize("settings, message", [
    (dict(keep=1.0), "keep rate must be in"), (dict(keep=0.0), "keep rate must be in"),
    (dict(keep=0.8, fraction=0.0), "fraction must be in"), (dict(keep=0.8, fraction=1.0), "fraction must be in"),
    (dict(keep=0.8, period=0), "period must be >= 1"),
])
def test_out_of_range_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ExampleFilter(20, **settings)


def test_a_checkpoint_of_other_filter_settings_is_refused():
    f = ExampleFilter(20, keep=0.8, fraction=0.1, seed=3)
    state = f.state_dict()
    ExampleFilter(20, keep=0.8, fraction=0.1, seed=3).load_state_dict(state)  # the same settings load
    for other in (dict(seed=4), dict(fraction=0.15), dict(period=29)):
        with pytest.raises(ValueError, match="example filtering settings differ"):
            ExampleFilter(20, **{**dict(keep=0.8, fraction=0.1, seed=3), **other}).load_state_dict(state)
