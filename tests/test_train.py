"""Trainer, checkpoints, data, DDP and the evaluation sweep, on CPU with tiny models.

Oracles: the digits run must learn (accuracy far above the 10 % of chance); a resumed run must
end with the bytes of the uninterrupted one; both DDP ranks must see the same rho sequence and
end with identical weights; the sweep's rho = 1 accuracy must equal the trainer's evaluation.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pss_kernels import evaluate as evaluate_cli
from pss_kernels.train import CheckpointError, TrainConfig, Trainer, load_checkpoint, save_checkpoint
from pss_kernels.train.__main__ import main as train_main
from pss_kernels.train.checkpoint import capture_rng_state, restore_rng_state
from pss_kernels.train.cli import parse_config
from pss_kernels.train.config import config_from_dict, config_to_dict
from pss_kernels.train.data import build_dataset, digits_split
from pss_kernels.train.distributed import DistInfo, ShardedSampler
from pss_kernels.train.optim import ModelEma, warmup_cosine_factor

REPO = Path(__file__).resolve().parents[1]


# Tiny models: see conftest.single_thread.
pytestmark = pytest.mark.usefixtures("single_thread")


CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# A 2-block ViT on 16x16 digits with patch 8 (N = 5 tokens): seconds per run.
MICRO = dict(model="deit_tiny", embed_dim=16, depth=2, num_heads=2, patch_size=8, data="digits", img_size=16,
             batch_size=32, lr=2e-3, workers=0, progress=False)


def micro_config(out_dir, **overrides):
    return TrainConfig(**{**MICRO, "out_dir": str(out_dir), **overrides})


def train_records(log_path):
    return [json.loads(line) for line in open(log_path) if json.loads(line)["type"] == "train"]


DIGITS_EPOCHS = 15  # ~11 s on one core; seeds 0-3 end at 88-91 % top-1


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A real PSS run: linear 0.2 -> 1.0 with L1 scoring on scikit-learn's digits."""
    out_dir = tmp_path_factory.mktemp("digits")
    config = TrainConfig(model="deit_tiny", embed_dim=64, depth=4, num_heads=4, patch_size=8, data="digits",
                         img_size=32, epochs=DIGITS_EPOCHS, batch_size=64, lr=2e-3, drop_path=0.0,
                         schedule="linear:0.2,1.0", workers=0, out_dir=str(out_dir), progress=False, eval_every=0)
    summary = Trainer(config, CPU).fit()
    return out_dir, summary


def test_digits_run_learns(digits_run):
    out_dir, summary = digits_run
    records = train_records(out_dir / "log.jsonl")
    assert summary["finished"] and summary["step"] == len(records) == DIGITS_EPOCHS * (1438 // 64)
    assert [r["rho"] for r in records][:3] == [0.2] * 3 and records[-1]["rho"] == 1.0
    first_epoch = np.mean([r["loss"] for r in records if r["epoch"] == 0])
    last_epoch = np.mean([r["loss"] for r in records if r["epoch"] == DIGITS_EPOCHS - 1])
    assert last_epoch < 0.6 * first_epoch
    assert summary["final_eval"]["top1"] > 70.0, summary["final_eval"]  # chance is 10 %
    assert summary["final_eval"]["top1"] <= summary["final_eval"]["top5"] and summary["final_eval"]["top5"] > 95.0
    assert summary["final_eval"]["loss"] < 0.7 * math.log(10)
    for key in ("rho", "tokens", "loss", "lr", "data_time", "compute_time", "images_per_s"):
        assert key in records[0]
    timing = summary["timing"]
    # N = 17 tokens: rho 1, 0.8, 0.6, 0.4, 0.2 keep 17, 14, 10, 7, 3; every count was timed.
    assert {k: e["keep_rates"] for k, e in timing["per_tokens"].items()} == {
        "17": [1.0, 1.0], "14": [0.8, 0.8], "10": [0.6, 0.6], "7": [0.4, 0.4], "3": [0.2, 0.2]}
    assert {e["source"] for e in timing["per_tokens"].values()} == {"measured"}
    assert timing["baseline_source"] == "measured" and not timing["estimated"]
    assert timing["projected_s"] > 0 and timing["baseline_s"] > 0
    assert json.loads((out_dir / "summary.json").read_text())["params_sha256"] == summary["params_sha256"]


def test_evaluate_sweep_writes_json_and_pictures(digits_run, tmp_path):
    out_dir, summary = digits_run
    code = evaluate_cli.main(["--checkpoint", str(out_dir / "checkpoint.pt"), "--out-dir", str(tmp_path),
                              "--batch-size", "64", "--workers", "0", "--num-pictures", "3"])
    assert code == 0
    report = json.loads((tmp_path / "sweep.json").read_text())
    rates = [r["keep_rate"] for r in report["results"]]
    assert rates == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    # N = 17 tokens: k = max(2, round(rho * 17)), the CLS token counted in N and in k.
    assert [r["tokens"] for r in report["results"]] == [17, 15, 14, 12, 10, 8, 7, 5, 3]
    for entry in report["results"]:
        assert 0.0 <= entry["top1"] <= 100.0 and entry["images"] == 359 and entry["images_per_s"] > 0
    # Same weights, same validation batches, same keep rate: the trainer's number exactly.
    assert report["results"][0]["top1"] == summary["final_eval"]["top1"]
    from PIL import Image
    for name in ("sweep.png", "patches.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.size[0] > 300 and picture.size[1] > 200


def test_kept_patch_mask_and_grey_out():
    index = torch.tensor([[0, 3, 1], [0, 4, 2]])  # CLS + patches 2, 0 and 3, 1 of a 2x2 grid
    kept = evaluate_cli.kept_patch_mask(index, 2, (2, 2))
    assert kept.tolist() == [[[True, False], [True, False]], [[False, True], [False, True]]]
    assert evaluate_cli.kept_patch_mask(None, 2, (2, 2)).all()
    images = torch.rand(2, 3, 4, 4)
    shown = evaluate_cli.grey_out_dropped(images, kept, patch_size=2)
    assert torch.equal(shown[0, :, :, :2], images[0, :, :, :2])
    greyed = shown[0, :, :, 2:]
    expected = evaluate_cli.DROPPED_IMAGE_WEIGHT * images[0, :, :, 2:] + (
        1 - evaluate_cli.DROPPED_IMAGE_WEIGHT) * evaluate_cli.DROPPED_GREY
    torch.testing.assert_close(greyed, expected)


@pytest.mark.parametrize("deterministic", [False, True])
def test_resume_continues_bit_for_bit(tmp_path, deterministic):
    # Drop path, EMA, clipping and a mid-epoch stop: every piece of state must survive the restart
    # (with --deterministic too: the mode that makes it hold on a GPU must not change it on CPU).
    settings = dict(epochs=2, drop_path=0.1, ema_decay=0.9, clip_grad=1.0, schedule="cyclic:0.2,1.0", eval_every=1,
                    deterministic=deterministic)
    straight = Trainer(micro_config(tmp_path / "straight", **settings), CPU).fit()
    first = Trainer(micro_config(tmp_path / "resumed", stop_at_step=17, **settings), CPU).fit()
    assert first["step"] == 17 and not first["finished"]
    resumed = Trainer(micro_config(tmp_path / "resumed", resume="auto", **settings), CPU).fit()
    assert resumed["step"] == straight["step"] == 88
    assert resumed["params_sha256"] == straight["params_sha256"]
    assert resumed["final_eval"] == straight["final_eval"]
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("straight", "resumed"))
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    columns = ("step", "rho", "tokens", "loss", "lr")
    assert ([[r[c] for c in columns] for r in train_records(tmp_path / "straight" / "log.jsonl")]
            == [[r[c] for c in columns] for r in train_records(tmp_path / "resumed" / "log.jsonl")])


def test_checkpoint_round_trip_and_atomic_write(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    state = {"model": {"w": torch.randn(3, 4)}, "step": 7, "config": {"lr": 0.1, "schedule": "none"},
             "rng": [capture_rng_state()]}
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["config"] == state["config"]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    expected_next = torch.rand(5)
    torch.rand(3)
    restore_rng_state(loaded["rng"][0])
    assert torch.equal(torch.rand(5), expected_next)

    def crash_mid_write(obj, handle):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 8})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 7  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temporary file left


def test_checkpoint_temporary_file_lies_beside_its_target(tmp_path, monkeypatch):
    # The final os.replace is atomic only within one file system: the temporary file must be written in
    # the target's directory, not in the system temp directory (here a directory of its own).
    import tempfile
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    target = tmp_path / "runs" / "a7" / "checkpoint.pt"  # its directory does not exist yet
    replaced = []
    real_replace = os.replace

    def spy(source, destination):
        replaced.append((Path(source), Path(destination), Path(source).is_file()))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", spy)
    save_checkpoint(target, {"step": 13})
    monkeypatch.undo()
    ((source, destination, existed),) = replaced
    assert destination == target and existed
    assert source.parent == target.parent and source.name.startswith(".checkpoint.pt.") and source.suffix == ".tmp"
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint.pt"]
    assert list(system_temp.iterdir()) == []
    assert load_checkpoint(target)["step"] == 13


def test_ema_is_decay_times_the_old_average_plus_the_rest_times_the_new_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(model, 0.9)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(0.37)
        model[0].bias.sub_(1.19)
    model.train()(torch.randn(5, 3))  # running statistics move, num_batches_tracked 0 -> 1
    ema.update(model)
    new = model.state_dict()
    averaged = ema.state_dict()
    for name, value in new.items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[name], 0.9 * initial[name] + 0.1 * value, msg=name)
        else:
            assert torch.equal(averaged[name], value), name  # integer buffers: copied
    assert int(averaged["1.num_batches_tracked"]) == 1
    # By hand: a weight moved by +0.37 moves the average by 0.037, a bias moved by -1.19 by -0.119.
    torch.testing.assert_close(averaged["0.weight"], initial["0.weight"] + 0.037)
    torch.testing.assert_close(averaged["0.bias"], initial["0.bias"] - 0.119)
    assert torch.equal(model.state_dict()["0.weight"], initial["0.weight"] + 0.37)  # the model is untouched
    # A second update with the same weights: the average closes another tenth of the remaining gap.
    ema.update(model)
    torch.testing.assert_close(ema.state_dict()["0.weight"], initial["0.weight"] + 0.37 * (1 - 0.9 ** 2))
    for decay in (0.0, 1.0):
        with pytest.raises(ValueError, match="ema_decay must be in"):
            ModelEma(model, decay)


def test_trainer_ema_takes_the_configured_decay_after_each_step(tmp_path):
    trainer = Trainer(micro_config(tmp_path, epochs=1, stop_at_step=1, ema_decay=0.83, eval_every=0), CPU)
    initial = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    trainer.fit()
    averaged = trainer.ema.state_dict()
    for name, value in trainer.model.state_dict().items():
        expected = 0.83 * initial[name] + 0.17 * value if value.is_floating_point() else value
        torch.testing.assert_close(averaged[name], expected, msg=name)
    assert not torch.equal(averaged["head.weight"], initial["head.weight"])  # one step did move it
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["ema"]
    assert all(torch.equal(saved[name], value) for name, value in averaged.items())


def test_corrupt_or_foreign_checkpoint_gives_clear_error(tmp_path):
    Trainer(micro_config(tmp_path / "run", epochs=1, stop_at_step=2), CPU).fit()
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, message in ((truncated, "corrupt"), (garbage, "corrupt"), (foreign, "not a pss_kernels"),
                          (tmp_path / "missing.pt", "does not exist")):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(micro_config(tmp_path / "other", epochs=1, resume=str(truncated)), CPU)


def test_resume_with_different_settings_is_refused(tmp_path, capsys):
    Trainer(micro_config(tmp_path, epochs=1, stop_at_step=2), CPU).fit()
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0.002, now 0.001"):
        Trainer(micro_config(tmp_path, epochs=1, lr=1e-3, resume="auto"), CPU)
    argv = ["--model", "deit_tiny", "--embed-dim", "16", "--depth", "2", "--num-heads", "2", "--patch-size", "8",
            "--data", "digits", "--img-size", "16", "--batch-size", "32", "--workers", "0", "--epochs", "1",
            "--lr", "0.002", "--schedule", "fixed:0.5", "--out-dir", str(tmp_path), "--resume", "auto", "--no-progress",
            "--scorer", "l1"]  # micro_config's (TrainConfig's default); the command line's for digits is random
    assert train_main(argv) == 2
    listed = [line.strip() for line in capsys.readouterr().err.splitlines() if line.startswith("  ")]
    assert listed == ["schedule: checkpoint 'cyclic:0.2,1.0', now 'fixed:0.5'"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_device_without_a_gpu_is_one_error_line(tmp_path, capsys):
    assert train_main(["--device", "cuda", "--epochs", "1", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pss-train: error: --device cuda: this torch sees no CUDA device") and "Traceback" not in err


# A gloo worker thread still alive at interpreter exit can abort the process while it frees the last
# collective's tensors ("terminate called without an active exception", rare, on a loaded machine):
# pss-train must leave with its process group destroyed and the workers joined, also when the run
# raises. Counted directly, since the abort itself is a race.
THREADS_AFTER_MAIN = """
import os, sys
from pss_kernels.train import trainer
from pss_kernels.train.__main__ import main
if os.environ["RUN_ENDS"] == "raising":
    fit = trainer.Trainer.fit
    def fit_then_fail(self):
        fit(self)
        raise RuntimeError("injected after the run")
    trainer.Trainer.fit = fit_then_fail
try:
    status = main(sys.argv[1:])
except RuntimeError as err:
    status = str(err)
names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
with open(os.path.join(os.environ["REPORT_DIR"], f"rank{os.environ['RANK']}.txt"), "w") as report:  # not stdout:
    report.write(f"status {status}, gloo workers left {names.count('pt_gloo_runloop')}")  # the ranks share it
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads through /proc/self/task")
@pytest.mark.parametrize("ending", ["finishing", "raising"])
def test_a_two_rank_run_joins_the_gloo_workers_before_exit(tmp_path, ending):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--no-python", sys.executable, "-c", THREADS_AFTER_MAIN,
               "--model", "deit_tiny", "--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--patch-size", "8",
               "--data", "digits", "--img-size", "16", "--epochs", "1", "--stop-at-step", "3", "--batch-size", "16",
               "--workers", "0", "--device", "cpu", "--out-dir", str(tmp_path), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RUN_ENDS": ending,
           "REPORT_DIR": str(tmp_path)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    status = "0" if ending == "finishing" else "injected after the run"
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"status {status}, gloo workers left 0", rank


# The second case: DeiT's augmentation with repeated augmentation across the two ranks.
DDP_AUGMENT = ["--repeated-aug", "3", "--rand-augment", "rand-m9-mstd0.5-inc1", "--random-erasing", "0.25",
               "--mixup", "0.8", "--cutmix", "1.0"]


@pytest.mark.parametrize("extra", [[], DDP_AUGMENT], ids=["plain", "deit-augment"])
def test_ddp_gloo_two_processes_same_rho_and_weights(tmp_path, extra):
    if extra:
        pytest.importorskip("kornia")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pss_kernels.train", "--model", "deit_tiny", "--embed-dim", "16", "--depth", "2",
               "--num-heads", "2", "--patch-size", "8", "--data", "digits", "--img-size", "16", "--epochs", "1",
               "--batch-size", "16", "--schedule", "cyclic:0.2,1.0", "--drop-path", "0.1", "--workers", "0",
               "--device", "cpu", "--out-dir", str(tmp_path), "--log-all-ranks", "--no-progress",
               "--lr", "0.001", "--lr-scaling", "lr", "--lr-base-batch", "16", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    rank1 = [json.loads(line) for line in open(tmp_path / "log.rank1.jsonl")]
    steps = 1438 // 2 // 16
    # The LR rule on the global batch: 16 per rank x 2 ranks = 32 images = 2 x --lr-base-batch, so the
    # peak is 0.002 on both ranks (the per-rank batch would leave it 0.001); the floor is not scaled ("lr").
    for log in (rank0, rank1):
        (config_record,) = [r for r in log if r["type"] == "config"]
        assert config_record["lr"] == pytest.approx(0.002) and config_record["min_lr"] == pytest.approx(1e-5)
        assert "global batch 32 / 16" in config_record["lr_rule"]
        # One warm-up epoch of 44 steps: step s runs at 0.002 (s + 1) / 44, the peak at the last.
        lrs = [r["lr"] for r in log if r["type"] == "train"]
        assert lrs[0] == pytest.approx(0.002 / 44) and lrs[-1] == pytest.approx(0.002)
    rho0 = [r["rho"] for r in rank0 if r["type"] == "train"]
    assert len(rho0) == steps and len(set(rho0)) == 5
    assert rho0 == [r["rho"] for r in rank1 if r["type"] == "train"]
    # Different shards: different losses; after all-reduced steps: the same weights, bit for bit.
    assert [r["loss"] for r in rank0 if r["type"] == "train"] != [r["loss"] for r in rank1 if r["type"] == "train"]
    assert rank0[-1]["type"] == rank1[-1]["type"] == "end"
    assert rank0[-1]["params_sha256"] == rank1[-1]["params_sha256"]
    assert len(load_checkpoint(tmp_path / "checkpoint.pt")["rng"]) == 2  # per-rank RNG states for resume


def test_sharded_sampler_partitions_and_resumes():
    ranks = [ShardedSampler(10, rank=r, world_size=2, seed=3) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(4)
    shards = [[index for index, _ in sampler] for sampler in ranks]
    assert len(shards[0]) == len(shards[1]) == 5 and sorted(shards[0] + shards[1]) == list(range(10))
    keys = list(ranks[0])
    ranks[0].set_epoch(4, start=2)
    assert list(ranks[0]) == keys[2:] and len(ranks[0]) == 3
    ranks[0].set_epoch(5)
    next_epoch = list(ranks[0])
    assert [i for i, _ in next_epoch] != shards[0]  # a new permutation (fixed seed: checked once)
    assert not {s for _, s in next_epoch} & {s for _, s in keys}  # and fresh augmentation seeds
    uneven = [ShardedSampler(11, rank=r, world_size=2, shuffle=False, drop_last=False) for r in range(2)]
    assert [[i for i, _ in s] for s in uneven] == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]


def test_image_folder_and_transforms(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(("cat", "dog")):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / "a.png")
            Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(folder / "b.JPG")
            Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / "c.jpeg")  # greyscale
            (folder / "notes.txt").write_text("not an image")
    train_set, info = build_dataset("folder", train=True, img_size=32, data_dir=str(tmp_path))
    val_set, _ = build_dataset("folder", train=False, img_size=32, data_dir=str(tmp_path))
    assert len(train_set) == len(val_set) == 6 and info.num_classes == 2 and train_set.classes == ["cat", "dog"]
    image, label = train_set[(4, 123)]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    assert torch.equal(train_set[(4, 123)][0], image)  # augmentation is a function of the key's seed
    assert not torch.equal(train_set[(4, 124)][0], image)
    assert torch.equal(val_set[1][0], val_set[1][0])
    # Normalised with ImageNet statistics: the mean of uniform noise lands near (0.5 - mean) / std.
    assert abs(val_set[0][0][0].mean().item() - (0.5 - 0.485) / 0.229) < 0.3
    # Bicubic crops for the device augmentation: in [0, 1] (clamped, as PIL's 8-bit result), not normalised.
    bicubic, _ = build_dataset("folder", train=True, img_size=32, data_dir=str(tmp_path), interpolation="bicubic",
                               normalize=False)
    unit, _ = build_dataset("folder", train=True, img_size=32, data_dir=str(tmp_path), normalize=False)
    crop = bicubic[(4, 123)][0]
    assert crop.shape == (3, 32, 32) and 0.0 <= float(crop.min()) and float(crop.max()) <= 1.0
    assert not torch.equal(crop, unit[(4, 123)][0])  # the same box, resampled otherwise
    torch.testing.assert_close((unit[(4, 123)][0][0] - 0.485) / 0.229, image[0])  # normalised later: the same image
    with pytest.raises(ValueError, match="data_dir"):
        build_dataset("folder", train=True)
    with pytest.raises(ValueError, match="does not exist"):
        build_dataset("folder", train=True, data_dir=str(tmp_path / "nowhere"))
    # A validation class the training classes lack is refused, not dropped; an empty extra folder is not a class.
    (tmp_path / "val" / "empty").mkdir()
    assert len(build_dataset("folder", train=False, img_size=32, data_dir=str(tmp_path))[0]) == 6
    bird = tmp_path / "val" / "bird"
    bird.mkdir()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(bird / "a.png")
    with pytest.raises(ValueError, match=r"has images of classes the training classes lack: \['bird'\]"):
        build_dataset("folder", train=False, img_size=32, data_dir=str(tmp_path))


def test_digits_and_synthetic_data():
    train_images, train_labels = digits_split(train=True)
    val_images, val_labels = digits_split(train=False)
    assert len(train_labels) + len(val_labels) == 1797 and len(val_labels) == 359
    assert train_images.shape[1:] == (3, 8, 8) and 0.0 <= float(train_images.min()) <= float(train_images.max()) <= 1
    digits, info = build_dataset("digits", train=True, img_size=24)
    assert digits[0][0].shape == (3, 24, 24) and info.num_classes == 10
    synthetic, info = build_dataset("synthetic", train=True, img_size=32, num_classes=7, synthetic_size=20)
    assert len(synthetic) == 20 and info.num_classes == 7
    assert torch.equal(synthetic[3][0], synthetic[(3, 99)][0]) and 0 <= synthetic[3][1] < 7


def test_warmup_cosine_learning_rate():
    factor = lambda step: warmup_cosine_factor(step, warmup_steps=10, total_steps=110, min_factor=0.01)  # noqa: E731
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.505)
    assert factor(110) == pytest.approx(0.01) and factor(500) == pytest.approx(0.01)


def test_command_line_flags():
    config = parse_config(["--model", "vit_base", "--no-rpb", "--abs-pos-embed", "--schedule", "fixed:0.6",
                           "--epochs", "3", "--ema-decay", "0.999", "--precision", "bf16", "--attn-impl", "published",
                           "--layer-scale-init", "0", "--stop-at-step", "5"])
    assert (config.model, config.rpb, config.abs_pos_embed, config.schedule, config.epochs) == (
        "vit_base", False, True, "fixed:0.6", 3)
    assert (config.ema_decay, config.precision, config.attn_impl, config.layer_scale_init, config.stop_at_step) == (
        0.999, "bf16", "published", 0.0, 5)
    with pytest.raises(SystemExit):
        parse_config(["--attn-impl", "fast"])
    with pytest.raises(SystemExit):
        parse_config(["--attn-impl", "eager"])  # renamed eager-index (issue 9)


def test_checkpoint_configs_with_the_old_eager_attn_impl_still_load():
    old = {**config_to_dict(TrainConfig()), "attn_impl": "eager"}
    assert config_from_dict(old).attn_impl == "eager-index"
    assert old["attn_impl"] == "eager"  # the checkpoint's own dict is left as it was
    assert config_from_dict({**old, "attn_impl": "published"}).attn_impl == "published"


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--patch-size", "0"], "argument --patch-size: must be >= 1, got 0"),
    (["--drop-path", "1.5"], r"argument --drop-path: must be in [0.0, 1.0), got 1.5"),
    (["--label-smoothing", "-0.1"], "argument --label-smoothing: must be in"),
    (["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
    (["--device", "tpu"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
])
def test_bad_flags_name_the_flag_and_value(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unusable_backend_flag_is_refused_with_its_reason(tmp_path, capsys):
    # The cuda backend never takes CPU tensors: the trainer says so before building anything.
    code = train_main(["--data", "digits", "--device", "cpu", "--sampler-backend", "cuda",
                       "--out-dir", str(tmp_path), "--epochs", "1", "--no-progress"])
    assert code != 0
    assert "--sampler-backend cuda cannot run on cpu" in capsys.readouterr().err


# ---- what a user hits (issue 12) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    """One step of the micro model: a real checkpoint to evaluate (the weights do not matter)."""
    out_dir = tmp_path_factory.mktemp("micro")
    Trainer(micro_config(out_dir, epochs=1, stop_at_step=1), CPU).fit()
    return out_dir / "checkpoint.pt"


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_evaluate_chooses_backends_and_reports_backend_problems_in_one_line(micro_checkpoint, tmp_path,
                                                                            monkeypatch, capsys):
    # A checkpoint trained with both ops on triton (on a GPU), evaluated on a CPU without the interpreter.
    state = load_checkpoint(micro_checkpoint)
    state["config"].update(sampler_backend="triton", attn_backend="triton")
    path = tmp_path / "triton.pt"
    save_checkpoint(path, state)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("PSS_KERNELS_BACKEND", raising=False)

    def evaluate(name, *flags):
        return evaluate_cli.main(["--checkpoint", str(path), "--out-dir", str(tmp_path / name), "--device", "cpu",
                                  "--keep-rates", "1.0,0.5", "--max-images", "16", "--num-pictures", "0",
                                  "--workers", "0", *flags])

    # No flag: the checkpoint's backends cannot run here, so the package's choice runs, with a note.
    assert evaluate("default") == 0
    err = capsys.readouterr().err
    assert "note: the checkpoint's --sampler-backend triton cannot run on cpu" in err
    assert "note: the checkpoint's --attn-backend triton cannot run on cpu" in err
    assert json.loads((tmp_path / "default" / "sweep.json").read_text())["backends"] == {
        "sampler_backend": "auto", "attn_backend": "auto"}
    # The flags of pss-train choose them.
    assert evaluate("torch", "--sampler-backend", "torch", "--attn-backend", "torch") == 0
    assert json.loads((tmp_path / "torch" / "sweep.json").read_text())["backends"] == {
        "sampler_backend": "torch", "attn_backend": "torch"}
    assert "note:" not in capsys.readouterr().err
    # A backend that cannot run here: one line, exit status 2, before any output is written.
    assert evaluate("refused", "--sampler-backend", "torch", "--attn-backend", "triton") == 2
    assert one_line(capsys.readouterr().err).startswith(
        "pss-evaluate: error: --attn-backend triton cannot run on cpu: triton needs CUDA tensors")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit):
        evaluate_cli.build_parser().parse_args(["--checkpoint", "x", "--attn-backend", "cuda"])  # no such kernel
    assert "invalid choice: 'cuda'" in capsys.readouterr().err
    # The global override, where it cannot run: one line too (it was a RuntimeError traceback).
    monkeypatch.setenv("PSS_KERNELS_BACKEND", "triton")
    assert evaluate("override", "--sampler-backend", "auto", "--attn-backend", "auto") == 2
    assert "PSS_KERNELS_BACKEND='triton' is not available" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("module, flags, package", [
    ("sklearn.datasets", [], "scikit-learn"),  # --data digits is the default
    ("PIL.Image", ["--data", "folder", "--data-dir", "images"], "pillow"),
])
def test_missing_train_extra_is_named_in_one_line(module, flags, package, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    code = train_main(["--device", "cpu", "--epochs", "1", "--workers", "0", "--no-progress",
                       "--out-dir", str(tmp_path), *flags])
    message = one_line(capsys.readouterr().err)
    assert code == 2
    assert message.startswith(f"pss-train: error: --data {'folder' if flags else 'digits'} needs {package}")
    assert message.endswith(f'pip install "pss-kernels[train]" (or pip install {package})')


def test_evaluate_without_matplotlib_says_so_before_the_sweep(micro_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = evaluate_cli.main(["--checkpoint", str(micro_checkpoint), "--out-dir", str(tmp_path / "eval"),
                              "--device", "cpu", "--max-images", "8", "--workers", "0"])
    message = one_line(capsys.readouterr().err)
    assert code == 2 and "pss-evaluate's plots needs matplotlib" in message
    assert 'pip install "pss-kernels[train]"' in message
    assert not (tmp_path / "eval").exists()  # refused up front, not after minutes of sweep


def test_deterministic_reaches_the_model_torch_and_the_checkpoint(tmp_path, monkeypatch):
    assert parse_config(["--deterministic"]).deterministic and not parse_config([]).deterministic
    modes = []
    real_step = Trainer.train_step

    def spy(self, *args):
        modes.append((torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled()))
        return real_step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    trainer = Trainer(micro_config(tmp_path, epochs=1, stop_at_step=3, deterministic=True), CPU)
    assert [block.attn.deterministic for block in trainer.model.blocks] == [True, True]
    trainer.fit()
    assert modes == [(True, True)] * 3
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # what cuBLAS needs for deterministic GEMMs
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["deterministic"] is True
    with pytest.raises(CheckpointError, match="deterministic: checkpoint True, now False"):
        Trainer(micro_config(tmp_path, epochs=1, resume="auto"), CPU)
    # A checkpoint written before the setting existed resumes as deterministic=False.
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    del state["config"]["deterministic"]
    save_checkpoint(tmp_path / "old" / "checkpoint.pt", state)
    assert Trainer(micro_config(tmp_path / "old", epochs=1, resume="auto"), CPU).step == 3


def test_evaluation_uses_every_token_whatever_the_schedule_left(tmp_path):
    from pss_kernels.train.validation import validate as evaluate
    trainer = Trainer(micro_config(tmp_path, epochs=1, stop_at_step=2, schedule="fixed:0.2"), CPU)
    trainer.fit()
    model = trainer.model
    assert model.keep_rate == 1.0  # the schedule's rate was set for each step only
    full = evaluate(model, trainer.val_loader, device=CPU.device, keep_rate=1.0)
    sampled = evaluate(model, trainer.val_loader, device=CPU.device, keep_rate=0.2)
    assert full["loss"] != sampled["loss"]
    model.keep_rate = 0.2  # what a user may leave on the model: eval mode samples too (by design)
    record = trainer.validate()
    assert record["keep_rate"] == 1.0 and (record["top1"], record["loss"]) == (full["top1"], full["loss"])
    assert trainer.validate(keep_rate=0.2)["loss"] == sampled["loss"]  # unless asked
    with pytest.raises(TypeError, match="keep_rate must be a float"):
        evaluate(model, trainer.val_loader, device=CPU.device, keep_rate=None)  # never model.keep_rate


def test_time_summary_printed_without_progress_and_estimated_where_untimed(tmp_path, capsys):
    # fixed:0.5 never runs at rho = 1: the baseline is its measured time plus the measured difference of
    # forward + backward at rho = 1, timed after training without touching weights or RNG.
    trainer = Trainer(micro_config(tmp_path / "fixed", epochs=1, schedule="fixed:0.5"), CPU)
    summary = trainer.fit()
    printed = capsys.readouterr().out
    timing = summary["timing"]
    assert timing["baseline_source"].startswith("estimated: the measured time at the run's rate plus")
    assert timing["baseline_s"] > 0 and timing["saving"] is not None and timing["estimated"]
    assert timing["per_tokens"]["2"]["source"] == "measured" and timing["estimated_share"] == 0
    assert "baseline (44 steps at rho=1):" in printed and "(estimated: the measured time" in printed
    assert "saving vs baseline:" in printed and "(estimated)" in printed  # progress=False in MICRO
    state = load_checkpoint(tmp_path / "fixed" / "checkpoint.pt")
    assert torch.equal(torch.get_rng_state(), state["rng"][0]["torch"])  # the probe restored the RNG
    assert all(p.grad is None for p in trainer.model.parameters())
    assert all(torch.equal(value, state["model"][name]) for name, value in trainer.model.state_dict().items())
    # A continuous schedule (quantum none): each rate is met once or twice, so none was timed per rate.
    summary = Trainer(micro_config(tmp_path / "cosine", epochs=2, img_size=32, schedule="warmup_cosine:0.3"),
                      CPU).fit()
    timing = summary["timing"]
    num_rates = sum(entry["num_keep_rates"] for entry in timing["per_tokens"].values())
    assert num_rates > 20 and len(timing["per_tokens"]) < num_rates
    assert timing["projected_s"] > 0 and timing["baseline_s"] > 0 and timing["saving"] is not None
    assert "projected: n/a" not in capsys.readouterr().out
