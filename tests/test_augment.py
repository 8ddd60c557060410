"""Device-side augmentation (train/data/augment.py) against hand computations and PIL.

Oracles: RandAugment's ops against PIL's ImageOps / ImageEnhance / Image.transform as timm calls
them, its level -> argument table by hand, its draw statistics against timm's law (op uniform,
p = 0.5, magnitude N(9, 0.5) clipped to [0, 10]); Mixup / CutMix targets and images against the
partner and lambda they report; soft-target cross-entropy against F.cross_entropy's smoothing.
"""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("kornia")

from pss_kernels.train.data.augment import (DeviceAugment, MixupCutmix, RandAugment, RandAugmentSpec,  # noqa: E402
                                            RandomErasing, TrainLoss, rand_augment_ops, seeded_rng,
                                            smooth_one_hot, soft_target_cross_entropy, step_seed)

pytestmark = pytest.mark.usefixtures("single_thread")

DEIT_RA = "rand-m9-mstd0.5-inc1"


def gradient_images(batch=1, height=24, width=32):
    """Smooth RGB ramps in [0, 1], quantised to 8 bits (what PIL holds)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.stack([xx, yy, xx * yy], 0)
    images = torch.stack([image.roll(i, dims=-1) for i in range(batch)])
    return (images * 255).round() / 255


def test_spec_parses_timm_strings():
    assert RandAugmentSpec.parse(DEIT_RA) == RandAugmentSpec(magnitude=9, num_ops=2, magnitude_std=0.5,
                                                             magnitude_max=10, increasing=True)
    assert RandAugmentSpec.parse("rand-m7-n3") == RandAugmentSpec(magnitude=7, num_ops=3)
    assert RandAugmentSpec.parse("rand-mstd101").magnitude_std == float("inf")  # timm: uniform in [0, m]
    for bad in ("auto-m9", "rand-m9-x3", "rand-m9-mstdx"):
        with pytest.raises(ValueError):
            RandAugmentSpec.parse(bad)


def test_level_to_argument_table_is_timms():
    # m = 9 -> level 0.9; sign +1 / -1 per image (timm's _randomly_negate).
    ops = {op.name: op for op in rand_augment_ops(True, torch.zeros(3), "bilinear")}
    assert list(ops) == ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                         "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                         "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
    level, sign = torch.tensor([0.9, 0.9, 1.0], dtype=torch.float64), torch.tensor([1.0, -1.0, 1.0],
                                                                                  dtype=torch.float64)

    def arg(name):
        return ops[name].level_to_arg(level, sign).tolist()

    assert arg("Rotate") == pytest.approx([27.0, -27.0, 30.0])
    assert arg("PosterizeIncreasing") == [1.0, 1.0, 0.0]  # 4 - int(level * 4) bits kept
    assert arg("SolarizeIncreasing") == [26.0, 26.0, 0.0]  # 256 - int(level * 256)
    assert arg("SolarizeAdd") == [99.0, 99.0, 110.0]
    assert arg("ColorIncreasing") == pytest.approx([1.81, 0.19, 1.9])  # 1 +- 0.9 level
    assert arg("ShearX") == pytest.approx([0.27, -0.27, 0.3])
    assert arg("TranslateYRel") == pytest.approx([0.405, -0.405, 0.45])
    plain = {op.name: op for op in rand_augment_ops(False, torch.zeros(3), "bilinear")}
    assert plain["Posterize"].level_to_arg(level, sign).tolist() == [3.0, 3.0, 4.0]
    assert plain["Color"].level_to_arg(level, sign).tolist() == pytest.approx([1.72, 1.72, 1.9])


def test_ops_compute_what_pil_computes():
    Image = pytest.importorskip("PIL.Image")
    from PIL import ImageEnhance, ImageOps
    images = gradient_images()
    pil = Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    height, width = images.shape[-2:]
    fill = (128, 128, 128)
    ops = {op.name: op for op in rand_augment_ops(True, torch.tensor([128 / 255] * 3), "bilinear")}
    bilinear = dict(resample=Image.BILINEAR, fillcolor=fill)
    colour = {
        "AutoContrast": (None, ImageOps.autocontrast), "Equalize": (None, ImageOps.equalize),
        "Invert": (None, ImageOps.invert),
        "PosterizeIncreasing": (2.0, lambda p: ImageOps.posterize(p, 2)),
        "SolarizeIncreasing": (100.0, lambda p: ImageOps.solarize(p, 100)),
        "SolarizeAdd": (60.0, lambda p: p.point([min(255, v + 60) if v < 128 else v for v in range(256)] * 3)),
        "ColorIncreasing": (1.7, lambda p: ImageEnhance.Color(p).enhance(1.7)),
        "ContrastIncreasing": (0.4, lambda p: ImageEnhance.Contrast(p).enhance(0.4)),
        "BrightnessIncreasing": (1.5, lambda p: ImageEnhance.Brightness(p).enhance(1.5)),
        "SharpnessIncreasing": (1.9, lambda p: ImageEnhance.Sharpness(p).enhance(1.9)),
    }
    geometric = {
        "Rotate": (20.0, lambda p: p.rotate(20.0, **bilinear)),
        "ShearX": (0.2, lambda p: p.transform(p.size, Image.AFFINE, (1, 0.2, 0, 0, 1, 0), **bilinear)),
        "ShearY": (-0.2, lambda p: p.transform(p.size, Image.AFFINE, (1, 0, 0, -0.2, 1, 0), **bilinear)),
        "TranslateXRel": (0.25, lambda p: p.transform(p.size, Image.AFFINE, (1, 0, 0.25 * width, 0, 1, 0), **bilinear)),
        "TranslateYRel": (-0.25, lambda p: p.transform(p.size, Image.AFFINE, (1, 0, 0, 0, 1, -0.25 * height),
                                                       **bilinear)),
    }

    def run(name, value):
        arg = None if value is None else torch.tensor([value], dtype=torch.float64)
        return ops[name].apply(images.clone(), arg)

    def pil_result(function):
        return torch.from_numpy(np.asarray(function(pil)).astype(np.float32) / 255).permute(2, 0, 1)[None]

    for name, (value, function) in colour.items():
        torch.testing.assert_close(run(name, value), pil_result(function), atol=2 / 255, rtol=0, msg=name)
    for name, (value, function) in geometric.items():
        ours, expected = run(name, value), pil_result(function)
        # Away from the edge of the filled area (where PIL and grid_sample treat the border pixel
        # differently) the resampled values agree; the fill itself is the given colour.
        filled = ((expected - 128 / 255).abs() < 1 / 255).all(1, keepdim=True).float()
        near_fill = F.max_pool2d(filled, 7, 1, 3).bool().expand_as(ours)
        assert (~near_fill).float().mean() > 0.5, name
        torch.testing.assert_close(ours[~near_fill], expected[~near_fill], atol=2 / 255, rtol=0, msg=name)
        far_inside_fill = (-F.max_pool2d(-filled, 5, 1, 2)).bool().expand_as(ours)
        torch.testing.assert_close(ours[far_inside_fill], torch.full_like(ours[far_inside_fill], 128 / 255))


def test_rand_augment_keeps_shape_dtype_range_and_is_reproducible_under_a_seed():
    augment = RandAugment(RandAugmentSpec.parse(DEIT_RA), fill=(0.485, 0.456, 0.406), interpolation="bicubic")
    images = torch.rand(16, 3, 32, 32)
    before = torch.get_rng_state()
    with seeded_rng(7, images.device):
        first = augment(images)
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG never sees the draws
    with seeded_rng(7, images.device):
        again = augment(images)
    with seeded_rng(8, images.device):
        other = augment(images)
    assert first.shape == images.shape and first.dtype == images.dtype
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, again) and not torch.equal(first, other)
    changed = (first != images).flatten(1).any(1)
    assert 0 < int(changed.sum()) < 16  # per image: some drew two skipped ops (p = 0.25), most did not
    half = augment(images.double())
    assert half.dtype == torch.float64


def test_rand_augment_draws_follow_timms_law():
    augment = RandAugment(RandAugmentSpec.parse(DEIT_RA))
    torch.manual_seed(0)
    params = augment.draw(200_000)
    counts = torch.bincount(params["op"], minlength=15).double() / 200_000
    assert counts.min() > 1 / 15 - 0.004 and counts.max() < 1 / 15 + 0.004  # uniform over the 15 ops
    assert abs(params["applied"].double().mean() - 0.5) < 0.005
    magnitude = params["magnitude"]
    assert float(magnitude.max()) == 10.0 and float(magnitude.min()) > 6.0  # N(9, 0.5) clipped to [0, 10]
    clipped = np.clip(np.random.default_rng(0).normal(9.0, 0.5, 1_000_000), 0, 10)  # the law, drawn by numpy
    assert abs(float(magnitude.mean()) - clipped.mean()) < 0.005 and abs(float(magnitude.std()) - clipped.std()) < 0.005
    assert abs(float((magnitude == 10).double().mean()) - 0.02275) < 0.002  # P(N(9, 0.5) > 10) = 1 - Phi(2)
    assert abs(float((params["sign"] < 0).double().mean()) - 0.5) < 0.005


def test_random_erasing_fills_one_box_per_chosen_image_with_noise():
    images = torch.full((400, 3, 20, 20), 0.25)
    with seeded_rng(3, images.device):
        erased = RandomErasing(0.25)(images)
    changed = (erased != 0.25).any(1)  # (B, H, W)
    chosen = changed.flatten(1).any(1)
    assert abs(chosen.double().mean() - 0.25) < 0.07
    for mask in changed[chosen]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(mask.sum()) == int(box)  # one rectangle
        assert 0.02 * 400 - 2 <= int(box) <= 400 / 3 + 2
    noise = erased[:, 0][changed]
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1.0) < 0.05  # per-pixel N(0, 1)


def constant_batch(batch):
    """Image i is the constant i + 1 (so a mix reveals its partner and weight); label i."""
    images = (torch.arange(batch, dtype=torch.float32) + 1).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()
    return images, torch.arange(batch)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_targets_sum_to_one_and_mix_the_right_pairs(smoothing):
    batch = 8
    images, labels = constant_batch(batch)
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.5, label_smoothing=smoothing,
                      num_classes=batch)
    lambdas = []
    for seed in range(20):
        with seeded_rng(seed, images.device):
            mixed, partner, keep = mix.mix(images, labels)
        with seeded_rng(seed, images.device):
            mixed_again, targets = mix(images, labels)
        assert torch.equal(mixed, mixed_again)
        assert sorted(partner.tolist()) == list(range(batch))  # a permutation of the batch
        assert torch.all(keep == keep[0]) and 0.0 < float(keep[0]) < 1.0  # one lambda per batch (timm's "batch")
        lam = float(keep[0])
        lambdas.append(lam)
        # The image is lambda of its own and 1 - lambda of its partner's...
        torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[partner])
        # ... and so is the target, smoothed: off = s / K everywhere, 1 - s on the label.
        expected = torch.full((batch, batch), smoothing / batch)
        expected[torch.arange(batch), labels] += lam * (1 - smoothing)
        expected[torch.arange(batch), labels[partner]] += (1 - lam) * (1 - smoothing)
        torch.testing.assert_close(targets, expected)
        torch.testing.assert_close(targets.sum(1), torch.ones(batch))
    # lambda ~ Beta(0.8, 0.8): mean 1/2, variance 1/(4 (2a + 1)) = 0.0962 (not kornia's uniform: 1/12).
    assert abs(np.mean(lambdas) - 0.5) < 0.2


def test_mixup_lambda_is_beta_distributed():
    images, labels = constant_batch(2)
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.5, label_smoothing=0.0, num_classes=2)
    with seeded_rng(0, images.device):
        lambdas = torch.tensor([float(mix.mix(images, labels)[2][0]) for _ in range(3000)])
    assert abs(float(lambdas.mean()) - 0.5) < 0.02
    assert abs(float(lambdas.var()) - 1 / (4 * 2.6)) < 0.008


def test_cutmix_box_area_ratio_equals_one_minus_lambda():
    batch = 6
    images, labels = constant_batch(batch)
    mix = MixupCutmix(mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=batch)
    for seed in range(20):
        with seeded_rng(seed, images.device):
            mixed, partner, keep = mix.mix(images, labels)
        with seeded_rng(seed, images.device):
            _, targets = mix(images, labels)
        pasted = mixed != images  # where the partner's pixels are (partner != self)
        for i in range(batch):
            if int(partner[i]) == i:
                continue
            assert set(mixed[i].unique().tolist()) <= {float(images[i, 0, 0, 0]), float(images[partner[i], 0, 0, 0])}
            assert float(pasted[i].float().mean()) == pytest.approx(1 - float(keep[i]))
        boxes = pasted[:, 0][partner != torch.arange(batch)]
        assert all(torch.equal(box, boxes[0]) for box in boxes)  # one box per batch
        torch.testing.assert_close(targets.sum(1), torch.ones(batch))
        lam = float(keep[0])
        assert float(targets[0, 0]) == pytest.approx(lam * 0.9 + 0.1 / batch
                                                     + (0.9 * (1 - lam) if int(partner[0]) == 0 else 0.0))


def test_one_of_mixup_or_cutmix_per_batch_at_the_switch_probability():
    images, labels = constant_batch(4)
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0, num_classes=4)
    kinds = []
    for seed in range(300):
        with seeded_rng(seed, images.device):
            mixed, partner, keep = mix.mix(images, labels)
        own_or_partner = (mixed == images) | (mixed == images[partner])
        kinds.append(bool(own_or_partner.all()) and float(keep[0]) not in (0.0, 1.0))  # hard paste: CutMix
    assert 0.4 < np.mean(kinds) < 0.6


def test_soft_target_cross_entropy_is_label_smoothing_for_one_hot_targets():
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    for smoothing in (0.0, 0.1):
        targets = smooth_one_hot(labels, 7, smoothing)
        expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        torch.testing.assert_close(soft_target_cross_entropy(logits, targets), expected)
        torch.testing.assert_close(TrainLoss(smoothing)(logits, targets), expected)
        torch.testing.assert_close(TrainLoss(smoothing)(logits, labels), expected)


def test_pipeline_normalises_after_colour_ops_and_is_seeded():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    images, labels = torch.rand(6, 3, 16, 16), torch.arange(6) % 3
    augment = DeviceAugment(mean=mean, std=std, num_classes=3, rand_augment=DEIT_RA, color_jitter=0.4,
                            random_erasing=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    assert augment.unit_range and augment.soft_targets and augment.color_jitter is None  # jitter off with RA (timm)
    first, targets = augment(images, labels, seed=11)
    again, targets_again = augment(images, labels, seed=11)
    assert torch.equal(first, again) and torch.equal(targets, targets_again)
    assert targets.shape == (6, 3) and torch.allclose(targets.sum(1), torch.ones(6))
    only_jitter = DeviceAugment(mean=mean, std=std, num_classes=3, color_jitter=0.4)
    assert only_jitter.color_jitter is not None and not only_jitter.soft_targets
    jittered, same_labels = only_jitter(images, labels, seed=1)
    assert same_labels is labels
    unit = jittered * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert float(unit.min()) >= -1e-6 and float(unit.max()) <= 1 + 1e-6  # jitter on [0, 1], then normalised
    assert not torch.allclose(unit, images)
    erasing_only = DeviceAugment(mean=mean, std=std, num_classes=3, random_erasing=1.0)
    assert not erasing_only.unit_range  # erasing and mixing work on the loader's normalised images
    erased, _ = erasing_only(images, labels, seed=2)
    assert (erased != images).flatten(1).any(1).all()


def test_step_seeds_differ_per_step_and_rank():
    seeds = {step_seed(0, step, rank, 4) for step in range(100) for rank in range(4)}
    assert len(seeds) == 400 and step_seed(1, 0, 0, 4) != step_seed(0, 0, 0, 4)


def test_augmentation_without_kornia_names_the_flag(monkeypatch, tmp_path, capsys):
    from pss_kernels.train.__main__ import main as train_main
    monkeypatch.setitem(sys.modules, "kornia", None)
    code = train_main(["--device", "cpu", "--epochs", "1", "--workers", "0", "--no-progress", "--mixup", "0.8",
                       "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("pss-train: error: --mixup needs kornia") and "(or pip install kornia)" in err


def cutmix_share(mix, seeds):
    """The share of `seeds` whose batch went through kornia's CutMix (counted on its forward)."""
    calls = []
    handle = mix.cutmix.register_forward_hook(lambda module, args, output: calls.append(1))
    images, labels = constant_batch(4)
    try:
        for seed in seeds:
            before = len(calls)
            with seeded_rng(seed, images.device):
                mixed, partner, keep = mix.mix(images, labels)
            if len(calls) == before:  # Mixup: one lambda, every pixel a blend of the image and its partner
                lam = float(keep[0])
                torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[partner])
    finally:
        handle.remove()
    return len(calls) / len(seeds)


@pytest.mark.parametrize("switch_prob", [0.8, 0.15])
def test_cutmix_is_chosen_with_the_switch_probability_not_its_complement(switch_prob):
    # 400 batches: the share's standard deviation is <= 0.02; 1 - p (0.2 / 0.85) is 15+ of them away.
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch_prob, label_smoothing=0.0, num_classes=4)
    assert abs(cutmix_share(mix, range(400)) - switch_prob) < 0.07


def test_a_single_mixer_ignores_the_switch_probability():
    # CutMix alone: every batch, even with switch_prob 0 (there is no Mixup to switch to).
    only_cutmix = MixupCutmix(mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.0, label_smoothing=0.0, num_classes=4)
    assert cutmix_share(only_cutmix, range(25)) == 1.0
    only_mixup = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=1.0, label_smoothing=0.0, num_classes=4)
    assert only_mixup.cutmix is None
    images, labels = constant_batch(4)
    for seed in range(10):  # Mixup every batch, with switch_prob 1
        with seeded_rng(seed, images.device):
            mixed, partner, keep = only_mixup.mix(images, labels)
        torch.testing.assert_close(mixed, float(keep[0]) * images + (1 - float(keep[0])) * images[partner])
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        MixupCutmix(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, label_smoothing=0.0, num_classes=4)


def test_the_run_config_reaches_every_augmentation_component():
    from pss_kernels.train import TrainConfig
    from pss_kernels.train.data.augment import build_device_augment
    mean, std = (0.37, 0.61, 0.13), (0.21, 0.27, 0.33)
    config = TrainConfig(rand_augment="rand-m7-n1-mstd0", mixup=0.7, cutmix=1.3, mixup_switch_prob=0.83,
                         label_smoothing=0.07, interpolation="bicubic", random_erasing=0.31)
    augment = build_device_augment(config, mean, std, num_classes=11)
    mix = augment.mixup_cutmix
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.switch_prob, mix.label_smoothing, mix.num_classes) == (
        0.7, 1.3, 0.83, 0.07, 11)
    assert augment.random_erasing.probability == 0.31
    assert augment.rand_augment.spec == RandAugmentSpec(magnitude=7, num_ops=1, magnitude_std=0.0)
    # RandAugment's geometric ops fill with the dataset mean and resample with the run's interpolation.
    images = gradient_images(1, 24, 32)
    angle = torch.tensor([23.0], dtype=torch.float64)
    rotate = {op.name: op for op in augment.rand_augment.ops}["Rotate"]
    expected = {op.name: op for op in rand_augment_ops(False, torch.tensor(mean), "bicubic")}["Rotate"]
    rotated = rotate.apply(images.clone(), angle)
    torch.testing.assert_close(rotated, expected.apply(images.clone(), angle))
    torch.testing.assert_close(rotated[0, :, 0, 0], torch.tensor(mean))  # a corner rotated out: the fill
    bilinear = {op.name: op for op in rand_augment_ops(False, torch.tensor(mean), "bilinear")}["Rotate"]
    assert not torch.allclose(rotated, bilinear.apply(images.clone(), angle))
    assert build_device_augment(TrainConfig(), mean, std, num_classes=11) is None  # nothing asked: no kornia


def test_spec_boundaries_and_the_magnitude_clip():
    # mstd > 100 means uniform in [0, m] (timm); exactly 100 is a Gaussian std of 100.
    assert RandAugmentSpec.parse("rand-m9-mstd100").magnitude_std == 100.0
    assert RandAugmentSpec.parse("rand-m9-mstd100.5").magnitude_std == float("inf")
    assert RandAugmentSpec.parse("rand-m9-inc0").increasing is False
    spec = RandAugmentSpec.parse("rand-m9-mmax7.5-n3")
    assert (spec.magnitude, spec.magnitude_max, spec.num_ops) == (9.0, 7.5, 3)
    torch.manual_seed(0)
    assert RandAugment(spec).draw(50)["magnitude"].tolist() == [7.5] * 50  # m = 9 clipped to mmax
    torch.manual_seed(0)
    uniform = RandAugment(RandAugmentSpec.parse("rand-m6-mstd101")).draw(20_000)["magnitude"]
    assert 0.0 <= float(uniform.min()) < 0.01 and 5.99 < float(uniform.max()) <= 6.0  # uniform in [0, m]
    assert abs(float(uniform.mean()) - 3.0) < 0.05
