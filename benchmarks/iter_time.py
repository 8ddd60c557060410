"""The main job: ViT training-iteration time per keep rate, against the peers, and what it means
for a whole training run under a Patch Sampling Schedule.

    python benchmarks/iter_time.py                 # GPU: vit_base + deit_small at 224
                                                   # CPU: deit_tiny at 224, batch 16 (~3 min on 2 cores)
    python benchmarks/iter_time.py --img-size 384
    python benchmarks/iter_time.py --smoke         # tiny configuration, any device, well under a minute

For each model and keep rate rho it times full training iterations (forward, backward, AdamW
step; bf16 autocast on GPU; synthetic data already on the device) of:

    pss          this package: fused sample_patches + rpb_attention (on GPU the kernels, asked for by name)
    pss-default  this package as a user gets it, backend=None (GPU runs only: on CPU that is pss): the
                 fastest path validated on the device, the PyTorch-only construction until a kernel is
    published    the PSS authors' published path: argsort + advanced indexing; the full (N, N, H) bias
                 copied per image and indexed twice (rows, then columns); eager attention
    eager-index  eager sampling; eager attention, the dense bias looked up once through the indexed
                 relative-position index (the published numbers at a lower cost)
    sdpa-bias    eager sampling; the dense per-image bias as SDPA's attn_mask, EFFICIENT kernel on GPU (timm Beit)
    pss-budget   this package on packed tokens (issue 19): the budget allocation, the batch keeps
                 round(rho B N) tokens (pss: B round(rho N), within a token an image of it), each image its
                 own count; sample_patches_varlen + rpb_attention_varlen with pss's backends (the fused
                 packed kernels on GPU): what packing costs a whole iteration. At rho = 1 it is pss's
                 dense computation (the model samples nothing there).
    flex         eager sampling; FlexAttention with a score_mod gathering the bias table
    baseline     the plain ViT without relative position bias at rho = 1 on SDPA FLASH

The cases of one model are interleaved, so that a slow spell of a shared machine falls on all
of them alike: each case is warmed up once, then `--rounds` rounds each time one block of
every case in turn (`--iters` timed iterations per case, spread over the rounds); the median
and quartiles are over all of a case's timed iterations. An implementation that cannot train
on the device at all (FlexAttention on CPU: no backward there) is reported once, with the reason.

It then projects epoch and run time under each schedule from the schedule's own rho shares
(see pss_kernels/train/timing.py). Output: a table (stdout), progress lines (stderr), a JSON document and
a PNG plot. Without a GPU it runs deit_tiny at 224 px (197 tokens), labelled as a CPU run;
CPU and --smoke results go under ./runs/iter_time/ rather than benchmarks/results/ (which holds
GPU results).
"""
from __future__ import annotations

import time

PROCESS_STARTED = time.perf_counter()  # the time budget counts from here, imports and CUDA start included

import argparse  # noqa: E402
import functools
import gc
import json
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

try:
    import pss_kernels
except ImportError as err:  # run from a checkout without installing
    raise SystemExit(f"iter_time.py: cannot import pss_kernels ({err}); install it (pip install .) "
                     "or run from the repository root with PYTHONPATH=.") from err
from pss_kernels._backends import (BACKENDS, ENV_VAR as BACKEND_ENV_VAR, OP_BACKENDS, backend_status,
                                   resolve_backend)
from pss_kernels.models import MODEL_CONFIGS, create_model
from pss_kernels.ops.rpb_attention import op as rpb_attention_op
from pss_kernels.ops.rpb_attention.peers import flex_training_unavailable
from pss_kernels.ops.sample_patches import op as sample_patches_op
from pss_kernels.models.packed import packed_backend
from pss_kernels.ops.varlen import op as varlen_op, static_total
from pss_kernels.schedules import build_schedule

from _iter_time_plot import plot_report
from _iter_time_report import (EAGER_PEERS, TARGET_MODEL, evaluate_targets, format_errors, format_projection_table,
                               format_targets, format_timing_table, format_unavailable)
from pss_kernels.train.timing import IMAGENET_1K_TRAIN_IMAGES, project_run, steps_per_epoch
from _timing import (TimeBudget, TimingStats, context_lost, dynamo_recompile_limit, environment_info, file_slug,
                     host_issue_ms, profile_step, synchronize, time_samples)
from _train_step import TrainingStep

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOCAL_DIR = Path("runs") / "iter_time"  # CPU and smoke runs: not GPU results, not committed
NUM_CLASSES = 1000
PATCH_SIZE = 16


@dataclass(frozen=True)
class Implementation:
    """How one implementation builds its model (`create_model` arguments) and what it is."""
    name: str
    rpb: bool
    attn_impl: str
    sampler_impl: str
    description: str
    allocation: str = "fixed"  # create_model's: "budget" / "mass" run the packed path


IMPLEMENTATIONS: Dict[str, Implementation] = {
    "pss": Implementation("pss", True, "pss", "pss", "this package: fused sample_patches + rpb_attention"),
    "pss-default": Implementation("pss-default", True, "pss", "pss",
                                  "this package with backend=None, the default a user gets (GPU runs only)"),
    "published": Implementation("published", True, "published", "eager",
                                "the published PSS path: argsort + advanced indexing; full (N, N, H) bias copied "
                                "per image, indexed twice; eager attention"),
    "eager-index": Implementation("eager-index", True, "eager-index", "eager",
                                  "eager sampling; eager attention, dense bias looked up once through the indexed "
                                  "relative-position index"),
    "sdpa-bias": Implementation("sdpa-bias", True, "sdpa-bias", "eager",
                                "eager sampling; dense per-image bias as SDPA attn_mask, EFFICIENT on GPU (timm Beit)"),
    "pss-budget": Implementation("pss-budget", True, "pss", "pss",
                                 "this package on packed tokens, budget allocation (round(rho B N) tokens a batch, a "
                                 "count per image): sample_patches_varlen + rpb_attention_varlen, pss's backends",
                                 allocation="budget"),
    "flex": Implementation("flex", True, "flex", "eager",
                           "eager sampling; FlexAttention score_mod gathering the bias table"),
}
BASELINE = Implementation("baseline", False, "pss", "pss",
                          "plain ViT without relative position bias, rho = 1, SDPA FLASH attention")

# Issue 5: the paper's per-GPU batch sizes on the GPU. Issue 9: on CPU the paper's 197 tokens with a
# batch whose ratios mean something (a 2-core machine: about 1 s per rho = 1 iteration, 3 minutes in
# all); a tiny configuration for smoke runs (tests, CI).
GPU_DEFAULTS = {"models": ["vit_base", "deit_small"], "img_size": 224, "warmup": 10, "iters": 50, "rounds": 5}
GPU_BATCH_SIZES = {"vit_base": 128, "deit_small": 256}
GPU_OTHER_BATCH_SIZE = 128
CPU_DEFAULTS = {"models": ["deit_tiny"], "img_size": 224, "warmup": 1, "iters": 8, "rounds": 8}
CPU_BATCH_SIZE = 16
SMOKE_DEFAULTS = {"models": ["deit_tiny"], "img_size": 64, "warmup": 2, "iters": 5, "rounds": 5}
SMOKE_BATCH_SIZE = 8
DEFAULT_KEEP_RATES = [1.0, 0.8, 0.6, 0.4, 0.2]
DEFAULT_SCHEDULES = ["fixed:0.6", "linear:0.2,1.0", "cyclic:0.2,1.0"]
BACKEND_CHOICES = ("default",) + BACKENDS  # "default": backend=None, the package's own choice
FLEX_RECOMPILE_LIMIT = 64  # see _timing.dynamo_recompile_limit


# ----------------------------------------------------------------------------- command line

def _split_list(values: List[str]) -> List[str]:
    """`--flag a b`, `--flag a,b` and `--flag a, b` all give [a, b]."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iter_time.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n".join(
            f"  {impl.name:<10} {impl.description}" for impl in [*IMPLEMENTATIONS.values(), BASELINE]),
        epilog="Defaults with a GPU: --models vit_base deit_small --img-size 224 --batch-size 128 for vit_base and "
               "256 for deit_small (128 otherwise) --warmup 10 --iters 50 --rounds 5 --amp bf16 --adamw fused. "
               f"Without one: --models deit_tiny --img-size 224 --batch-size {CPU_BATCH_SIZE} --warmup 1 --iters 8 "
               "--rounds 8, float32, --adamw foreach (about 3 minutes on 2 cores). With --smoke: --models deit_tiny "
               f"--img-size 64 --batch-size {SMOKE_BATCH_SIZE} --warmup 2 --iters 5 --rounds 5. CPU and smoke "
               "results go under ./runs/iter_time/.")
    what = parser.add_argument_group("what to measure")
    what.add_argument("--models", nargs="+", metavar="NAME",
                      help=f"model names, space or comma separated, from {', '.join(MODEL_CONFIGS)} "
                           "(default: see below)")
    what.add_argument("--keep-rates", nargs="+", metavar="RHO",
                      help="keep rates in (0, 1]; 1 skips sampling (default: 1.0 0.8 0.6 0.4 0.2)")
    what.add_argument("--impls", nargs="+", metavar="IMPL",
                      help=f"implementations from {', '.join(IMPLEMENTATIONS)} (default: all); the baseline "
                           "always runs")
    what.add_argument("--img-size", type=int, help="image side in pixels, divisible by 16 (default 224; 64 smoke)")
    what.add_argument("--batch-size", type=int, help="per-GPU batch for every model (default: 128 vit_base, "
                                                     f"256 deit_small; {CPU_BATCH_SIZE} on CPU; "
                                                     f"{SMOKE_BATCH_SIZE} smoke)")
    what.add_argument("--smoke", action="store_true",
                      help="tiny configuration on any device (tests, CI): checks the harness, its figures mean "
                           "nothing; never a GPU result")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--warmup", type=int, help="untimed iterations per case before its first timed block "
                                                   "(default 10 GPU; 1 CPU; 2 smoke)")
    timing.add_argument("--iters", type=int, help="timed iterations per case, spread over the rounds; the median "
                                                  "is reported (default 50 GPU; 8 CPU; 5 smoke)")
    timing.add_argument("--rounds", type=int,
                        help="interleaved rounds per model: each round times one block of every case in turn, so "
                             "the cases share the machine's slow spells; 1 = one case after the other "
                             "(default 5 GPU; 8 CPU; 5 smoke; never more than --iters)")
    timing.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    timing.add_argument("--amp", choices=("bf16", "none"),
                        help="autocast dtype for the forward (default bf16 on GPU, none = float32 on CPU)")
    timing.add_argument("--adamw", choices=("fused", "foreach"),
                        help="AdamW implementation for every case (default fused on GPU: its one kernel keeps the "
                             "fixed per-step cost low, which is what the rho = 0.2 ratio is about; foreach on CPU)")
    timing.add_argument("--compile", action="store_true",
                        help="torch.compile every model (default mode, static shapes): removes most host overhead, "
                             "but compiles once per keep rate and implementation (about a minute each for "
                             "vit_base on a GPU); narrow the run with --impls / --keep-rates")
    timing.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no new timed block after this many seconds: cases keep the rounds they got, "
                             "cases never timed are reported as skipped (the first round runs baseline, then "
                             "each implementation in --impls order, per model). Default: no limit")
    backends = parser.add_argument_group("pss backends (the other implementations use no package kernel)")
    backends.add_argument("--backend", choices=BACKEND_CHOICES,
                          help="backend of both pss kernels; 'default' passes backend=None (the package's own choice: "
                               "PSS_KERNELS_BACKEND, else each op's GPU_DEFAULT_BACKEND on GPU). Not given: "
                               "PSS_KERNELS_BACKEND if set, else on GPU triton for rpb_attention and the best "
                               "available (cuda > triton) for sample_patches; on CPU the package's choice")
    backends.add_argument("--attn-backend", choices=BACKEND_CHOICES, help="rpb_attention backend (overrides --backend)")
    backends.add_argument("--sampler-backend", choices=BACKEND_CHOICES,
                          help="sample_patches backend (overrides --backend)")
    projection = parser.add_argument_group("projection")
    projection.add_argument("--schedules", nargs="+", metavar="SPEC", default=DEFAULT_SCHEDULES,
                            help="schedule specs for pss_kernels.schedules.build_schedule, space separated "
                                 f"(default: {' '.join(DEFAULT_SCHEDULES)})")
    projection.add_argument("--epochs", type=int, default=100, help="epochs of the projected run (default 100)")
    projection.add_argument("--dataset-images", type=int, default=IMAGENET_1K_TRAIN_IMAGES,
                            help=f"training images per epoch (default ImageNet-1k: {IMAGENET_1K_TRAIN_IMAGES:,})")
    output = parser.add_argument_group("output")
    output.add_argument("--out-dir", type=Path,
                        help="folder for the JSON and PNG (default benchmarks/results on GPU; ./runs/iter_time "
                             "for CPU and --smoke runs)")
    output.add_argument("--profile", action="store_true",
                        help="also profile one pss iteration at the lowest keep rate per model (where the time "
                             "goes); a GPU run that misses a target profiles vit_base without this flag")
    return parser


def _keep_rate(text: str) -> float:
    rate = float(text)
    if not 0.0 < rate <= 1.0:
        raise ValueError
    return rate


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and fill the device-dependent defaults; bad values exit through parser.error (status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"argument --device: not a torch device: {args.device!r}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {args.device} requested but torch.cuda.is_available() is False")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"argument --device: only cuda and cpu are supported, got {args.device}")
    defaults = SMOKE_DEFAULTS if args.smoke else CPU_DEFAULTS if args.device.type == "cpu" else GPU_DEFAULTS
    for name in ("img_size", "warmup", "iters"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.rounds is None:
        args.rounds = min(defaults["rounds"], max(args.iters, 1))
    if args.amp is None:
        args.amp = "bf16" if args.device.type == "cuda" else "none"
    if args.adamw is None:
        args.adamw = "fused" if args.device.type == "cuda" else "foreach"

    args.models = _split_list(args.models) if args.models else list(defaults["models"])
    for model in args.models:
        if model not in MODEL_CONFIGS:
            parser.error(f"argument --models: unknown model {model!r}; choose from {', '.join(MODEL_CONFIGS)}")
    # pss-default is pss itself where pss asks for the package's default (CPU): timed on GPU runs only.
    args.impls = (_split_list(args.impls) if args.impls else
                  [name for name in IMPLEMENTATIONS if name != "pss-default" or args.device.type == "cuda"])
    for impl in args.impls:
        if impl not in IMPLEMENTATIONS:
            parser.error(f"argument --impls: unknown implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    try:
        args.keep_rates = ([_keep_rate(v) for v in _split_list(args.keep_rates)] if args.keep_rates
                           else list(DEFAULT_KEEP_RATES))
    except ValueError:
        parser.error(f"argument --keep-rates: each keep rate must be a number in (0, 1], got {args.keep_rates}")
    args.keep_rates = sorted(set(args.keep_rates), reverse=True)
    if args.img_size < PATCH_SIZE or args.img_size % PATCH_SIZE:
        parser.error(f"argument --img-size: must be a positive multiple of {PATCH_SIZE}, got {args.img_size}")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"argument --time-budget: must be > 0 seconds, got {args.time_budget}")
    for flag, value, minimum in (("--batch-size", args.batch_size, 1), ("--warmup", args.warmup, 0),
                                 ("--iters", args.iters, 1), ("--rounds", args.rounds, 1), ("--epochs", args.epochs, 1),
                                 ("--dataset-images", args.dataset_images, 1)):
        if value is not None and value < minimum:
            parser.error(f"argument {flag}: must be >= {minimum}, got {value}")
    if args.rounds > args.iters:
        parser.error(f"argument --rounds: at most --iters ({args.iters}) rounds (each times at least one "
                     f"iteration per case), got {args.rounds}")
    args.batch_sizes = {model: args.batch_size or (SMOKE_BATCH_SIZE if args.smoke else CPU_BATCH_SIZE
                                                   if args.device.type == "cpu" else
                                                   GPU_BATCH_SIZES.get(model, GPU_OTHER_BATCH_SIZE))
                        for model in args.models}
    for spec in args.schedules:
        try:
            build_schedule(spec, total_steps=100, steps_per_epoch=10)
        except (TypeError, ValueError) as err:
            parser.error(f"argument --schedules: {str(err).splitlines()[0]}")
    if args.out_dir is None:
        args.out_dir = RESULTS_DIR if run_kind(args) == "gpu" else LOCAL_DIR
    return args


# ----------------------------------------------------------------------------- backends

def requested_backends(args) -> Dict[str, Optional[str]]:
    """The backend= each pss kernel is called with (None = the package's own choice). --backend applies
    to each op that has that backend (as PSS_KERNELS_BACKEND does); --attn-backend / --sampler-backend
    to their op."""
    def pick(op: str, flag: Optional[str], auto: Optional[str]) -> Optional[str]:
        if flag is None and args.backend in OP_BACKENDS[op]:
            flag = args.backend
        if flag is None:
            return None if os.environ.get(BACKEND_ENV_VAR) or args.backend == "default" else auto
        return None if flag == "default" else flag

    attn_auto = sampler_auto = None
    if args.device.type == "cuda":
        # The kernels are not yet the package's GPU default (not validated on a GPU); this benchmark is
        # where they are measured, so it asks for them explicitly.
        attn_auto = "triton" if backend_status("triton", args.device).available else None
        sampler_auto = next((name for name in ("cuda", "triton") if backend_status(name, args.device).available),
                            None)
    return {"sample_patches": pick("sample_patches", args.sampler_backend, sampler_auto),
            "rpb_attention": pick("rpb_attention", args.attn_backend, attn_auto)}


# The implementations that run this package's ops, and the backends each asks for.
PACKAGE_IMPLS = ("pss", "pss-default", "pss-budget")


def backends_of(impl: Implementation, requested: Dict[str, Optional[str]]) -> Dict[str, Optional[str]]:
    """pss and pss-budget: the backends asked for (on GPU the kernels by name); pss-default: backend=None
    for both ops."""
    return {op: None for op in requested} if impl.name == "pss-default" else dict(requested)


def resolved_backends(requested: Dict[str, Optional[str]], device: torch.device,
                      keep_rate: float, allocation: str = "fixed") -> Dict[str, Optional[str]]:
    """The backend each pss kernel actually runs on (the ops' own resolution; raises if unavailable).
    sample_patches does not run at rho = 1 (the model skips sampling). A packed model (allocation other
    than fixed) at rho < 1 runs the packed ops, keyed by their own names."""
    if allocation != "fixed" and keep_rate < 1.0:  # what models/packed.py hands the packed ops
        sampler = packed_backend("sample_patches_varlen", requested["sample_patches"])
        attention = packed_backend("rpb_attention_varlen", requested["rpb_attention"])
        return {
            "sample_patches_varlen": resolve_backend("sample_patches_varlen", sampler, device,
                                                     varlen_op.SAMPLER_DEFAULT_BACKEND,
                                                     varlen_op.SAMPLER_DEFAULT_BACKEND),
            "rpb_attention_varlen": resolve_backend("rpb_attention_varlen", attention, device,
                                                    rpb_attention_op.GPU_DEFAULT_BACKEND,
                                                    rpb_attention_op.CPU_DEFAULT_BACKEND),
        }
    return {
        "sample_patches": (None if keep_rate == 1.0 else resolve_backend(
            "sample_patches", requested["sample_patches"], device, sample_patches_op.GPU_DEFAULT_BACKEND)),
        "rpb_attention": resolve_backend("rpb_attention", requested["rpb_attention"], device,
                                         rpb_attention_op.GPU_DEFAULT_BACKEND, rpb_attention_op.CPU_DEFAULT_BACKEND),
    }


def apply_backends(model: torch.nn.Module, requested: Dict[str, Optional[str]]) -> None:
    """Point every sampler and attention module of `model` at its kernel's backend."""
    samplers = [m for m in model.modules() if isinstance(m, pss_kernels.PatchSampler)]
    attentions = [m for m in model.modules() if isinstance(m, pss_kernels.RelPosAttention)]
    if not samplers or not attentions:
        raise RuntimeError("the pss model has no PatchSampler or RelPosAttention: backends cannot be set")
    for module in samplers:
        module.backend = requested["sample_patches"]
    for module in attentions:
        module.backend = requested["rpb_attention"]


# ----------------------------------------------------------------------------- measuring

# Anchors on CUDA: the baseline on SDPA FLASH (the speed of light for attention at that n), the
# dense-bias peer on SDPA EFFICIENT (the fused SDPA kernel that takes a bias with a gradient, as timm's Beit
# gets). Elsewhere SDPA picks its own kernel.
SDPA_BACKENDS = {BASELINE.name: "FLASH_ATTENTION", "sdpa-bias": "EFFICIENT_ATTENTION"}


def sdpa_backend(impl: Implementation, device: torch.device) -> Optional[str]:
    return SDPA_BACKENDS.get(impl.name) if device.type == "cuda" else None


def attention_context(impl: Implementation, device: torch.device):
    """Restrict SDPA to the implementation's anchor kernel (an error, recorded, if it cannot run)."""
    name = sdpa_backend(impl, device)
    if name is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, name)])


def build_model(model_name: str, impl: Implementation, args) -> torch.nn.Module:
    torch.manual_seed(0)  # every implementation starts from the same weights
    allocation = {} if impl.allocation == "fixed" else {"allocation": impl.allocation}
    model = create_model(model_name, img_size=args.img_size, num_classes=NUM_CLASSES, rpb=impl.rpb,
                         attn_impl=impl.attn_impl, sampler_impl=impl.sampler_impl, **allocation)
    return model.to(args.device)


def build_step(model_name: str, impl: Implementation, args, requested) -> TrainingStep:
    """The training step of one implementation's model; `step.model.keep_rate` selects the case."""
    model = build_model(model_name, impl, args)
    if impl.name in PACKAGE_IMPLS:
        apply_backends(model, backends_of(impl, requested))
    return TrainingStep(model, batch_size=args.batch_sizes[model_name], img_size=args.img_size,
                        num_classes=NUM_CLASSES, device=args.device,
                        amp_dtype=torch.bfloat16 if args.amp == "bf16" else None, fused_adamw=args.adamw == "fused",
                        compile=args.compile)


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()[:4000]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:  # a sticky CUDA error raises here again: the case that met it reports it
            pass


def out_of_memory(error: Optional[str]) -> bool:
    return bool(error) and "out of memory" in error.lower()


class Stopped(BaseException):
    """The run cannot go on (the CUDA context was lost, or SIGTERM): what is measured is reported.
    args: (reason,) or, raised again by run_model, (reason, that model's finished records). A
    BaseException, so that the per-case `except Exception` (a failing case is recorded, the run goes
    on) lets it through wherever SIGTERM lands."""

    def __str__(self) -> str:
        return str(self.args[0])


PROFILE_RESERVE_S = 25.0  # a missed target is profiled (a new model, warm-up, CUPTI) only with this left
BUILD_RESERVE_S = 15.0  # a case that needs its model built (and its kernels compiled) starts only with this left
HOST_TIMED = ("pss", "pss-budget")  # at the lowest rho: the host's time to issue a step is recorded too


def _stop_on_sigterm(signum, frame):
    # One-shot: coreutils' timeout sends SIGTERM to the process and again to its group, and a second
    # Stopped raised while the first is handled would escape the handlers that save the results.
    # The rest of the run (writing them) is bounded by timeout's SIGKILL, 10 s later.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped("stopped by SIGTERM (the GPU session's stage limit)")


def synchronize_quietly(device: torch.device) -> None:
    try:
        synchronize(device)
    except Exception:  # a sticky CUDA error: the next case reports it in its own error
        pass


def unavailable_implementations(impls: List[str], device: torch.device) -> Dict[str, str]:
    """{impl: reason} for the implementations that cannot train on `device` at all; they are
    reported once instead of failing in every case. FlexAttention has no backward on CPU."""
    unavailable = {}
    if "flex" in impls:
        reason = flex_training_unavailable(device)
        if reason:
            unavailable["flex"] = reason
    return unavailable


def round_sizes(iters: int, rounds: int) -> List[int]:
    """Timed iterations per case in each round: `iters` spread over `rounds`, the larger blocks first.

    >>> round_sizes(50, 5), round_sizes(7, 3)
    ([10, 10, 10, 10, 10], [3, 2, 2])
    """
    return [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]


def new_result(model_name: str, impl: Implementation, keep_rate: float, args) -> dict:
    """One case's JSON record, before it is measured."""
    num_tokens = 1 + (args.img_size // PATCH_SIZE) ** 2
    tokens = pss_kernels.num_kept_tokens(num_tokens, keep_rate)
    if impl.allocation == "budget" and keep_rate < 1.0:  # the batch's round(rho B N), per image on average
        batch = args.batch_sizes[model_name]
        tokens = round(static_total("budget", batch, num_tokens, keep_rate) / batch, 2)
    return {"model": model_name, "impl": impl.name, "keep_rate": keep_rate,
            "tokens": tokens,
            "batch_size": args.batch_sizes[model_name], "backends": None, "median_ms": None, "q1_ms": None,
            "q3_ms": None, "iters": None, "rounds": None, "images_per_s": None, "peak_memory_gib": None,
            "ratio_vs_rho1": None, "ratio_vs_baseline": None, "host_ms": None, "error": None}


class Case:
    """One (model, implementation, keep rate): its record and the timed samples of its blocks so far."""

    def __init__(self, model_name: str, impl: Implementation, keep_rate: float, args):
        self.impl, self.keep_rate = impl, keep_rate
        self.result = new_result(model_name, impl, keep_rate, args)
        self.samples_ms: List[float] = []
        self.rounds = 0
        self.peak_bytes: Optional[int] = None

    def snapshot(self) -> dict:
        """The record as it stands mid-run: the statistics of the blocks timed so far, if any."""
        if self.result["error"] is None and self.samples_ms:
            return dict(self.finish())
        return dict(self.result)

    def finish(self) -> dict:
        """The record with the statistics over every timed block (or the error)."""
        if self.result["error"] is None:
            stats = TimingStats.from_samples(self.samples_ms)
            self.result.update(stats.as_dict(), rounds=self.rounds,
                               images_per_s=self.result["batch_size"] / (stats.median_ms / 1e3))
            if self.peak_bytes is not None:
                self.result["peak_memory_gib"] = self.peak_bytes / 2**30
        return self.result


STATISTICS = ("median_ms", "q1_ms", "q3_ms", "iters", "rounds", "images_per_s", "peak_memory_gib", "host_ms")


def time_block(case: Case, step: TrainingStep, *, warmup: int, iters: int, args, requested,
               host_timed: bool = False) -> None:
    """Time `iters` iterations of `case` after `warmup` untimed ones; an exception becomes the case's error.

    Peak memory on CUDA is what the case would hold alone: the peak during the block above what
    was allocated before it, plus what this step itself held then (the other implementations'
    models, alive in an interleaved run, are not counted)."""
    device = args.device
    try:
        if case.result["backends"] is None:
            if case.impl.name in PACKAGE_IMPLS:
                case.result["backends"] = resolved_backends(backends_of(case.impl, requested), device, case.keep_rate,
                                                            case.impl.allocation)
            elif sdpa_backend(case.impl, device):
                case.result["backends"] = {"sdpa": sdpa_backend(case.impl, device)}
        step.model.keep_rate = case.keep_rate
        if device.type == "cuda":
            synchronize(device)
            before, held = torch.cuda.memory_allocated(device), step.held_bytes()
            torch.cuda.reset_peak_memory_stats(device)
        with attention_context(case.impl, device):
            case.samples_ms += time_samples(step, warmup=warmup, iters=iters, device=device)
        case.rounds += 1
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - before + held
            case.peak_bytes = max(case.peak_bytes or 0, peak)
    except Exception as err:  # one failing case (OOM, unsupported peer) must not end the run
        case.result["error"] = error_text(err)
        case.samples_ms = []
        # An earlier round's statistics (snapshot) must not stand beside the error as if measured.
        case.result.update({key: None for key in STATISTICS})
    if case.result["error"]:
        # Here, not in the except block: the traceback there still holds the failed step's tensors.
        synchronize_quietly(device)
        if context_lost(case.result["error"]):
            raise Stopped(f"the CUDA context was lost at {case.result['impl']} rho={case.keep_rate:g} "
                          f"({case.result['error'].splitlines()[0][:200]})")
        # Emptying the allocator's cache only after running out of memory: otherwise the next cases (no
        # warm-up after round 1) would pay cudaMalloc in their timed iterations.
        if out_of_memory(case.result["error"]):
            free_memory(device)
        else:
            gc.collect()
    elif host_timed and device.type == "cuda" and case.rounds == 1:
        # Where eager Python and launches may set the step time (the lowest rho): the host's time to
        # issue one step, beside the device's (a row with host_ms >= median_ms is host-bound).
        try:
            case.result["host_ms"] = host_issue_ms(step, device)
        except Exception:  # the timed blocks stand without it
            case.result["host_ms"] = None


class Progress:
    """Progress on stderr, so the table on stdout stays clean: one `[ 3/26] model impl rho ...` line
    per case as its first block is timed (or it fails, or is skipped), then one line per later round."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def first_round(self, case: Case, seconds: float) -> None:
        self.done += 1
        result, width = case.result, len(str(self.total))
        if result["error"]:
            outcome = f"ERROR {result['error'].splitlines()[0][:160]}"
        else:
            stats = TimingStats.from_samples(case.samples_ms)
            outcome = (f"{stats.median_ms:9.2f} ms [{stats.q1_ms:.2f}-{stats.q3_ms:.2f}] in round 1"
                       + (f"  {' '.join(f'{k}={v}' for k, v in result['backends'].items() if v)}"
                          if result["backends"] else ""))
        print(f"[{self.done:>{width}}/{self.total}] {result['model']:<10} {result['impl']:<11} "
              f"rho={result['keep_rate']:.1f} {result['tokens']:>4} tokens  {outcome}  ({seconds:.1f} s, "
              f"{time.perf_counter() - self.started:.0f} s total)", file=sys.stderr, flush=True)

    def round_done(self, model_name: str, round_number: int, rounds: int, cases: int, seconds: float) -> None:
        print(f"  {model_name}: round {round_number}/{rounds} timed {cases} cases in {seconds:.1f} s "
              f"({time.perf_counter() - self.started:.0f} s total)", file=sys.stderr, flush=True)


def is_target_case(model_name: str, impl_name: str, keep_rate: float, keep_rates: List[float]) -> bool:
    """The cases the targets are judged on (_iter_time_report.evaluate_targets)."""
    if model_name != TARGET_MODEL:
        return False
    if impl_name in (BASELINE.name, "pss"):
        return keep_rate in (1.0, min(keep_rates))
    return impl_name in EAGER_PEERS and keep_rate == min(keep_rates) < 1.0  # their speed-up targets are below 1


def case_priority(model_name: str, impl_name: str, keep_rate: float, keep_rates: List[float]) -> int:
    """0: the target cases; then what the other targets need: 1 pss at its other keep rates (the Cyclic
    projection), 2 the published-code peers below rho 1 (their speed-up targets); 3 the packed pss-budget
    (issue 19); 4 the rest. Only vit_base has targets: other models keep --impls order."""
    if model_name != TARGET_MODEL:
        return 0
    if is_target_case(model_name, impl_name, keep_rate, keep_rates):
        return 0
    if impl_name == "pss":
        return 1
    if impl_name in EAGER_PEERS and keep_rate < 1.0:
        return 2
    return 3 if impl_name == "pss-budget" else 4


def ordered_cases(model_name: str, implementations: List[Implementation], args) -> List["Case"]:
    """The cases of one model in timing order (case_priority, stable: --impls and --keep-rates order
    within a priority), so that a time budget spent within round 1 leaves the targets timed first."""
    cases = [Case(model_name, impl, keep_rate, args) for impl in implementations
             for keep_rate in ([1.0] if impl is BASELINE else args.keep_rates)]
    return sorted(cases, key=lambda case: case_priority(model_name, case.impl.name, case.keep_rate,
                                                        args.keep_rates))


def run_model(model_name: str, implementations: List[Implementation], args, requested, progress: Progress,
              budget: TimeBudget, on_progress=None) -> List[dict]:
    """Every case of one model, interleaved: round 1 warms each case up and times its first block,
    in order (baseline, then each implementation over the keep rates); each later round times one
    more block of every case in the same order. Each implementation's model is built when first
    needed and kept until the model's last round (each later round rotated by one case, see below).
    `on_progress(records)` gets every case's record as
    it stands after each block of round 1 and after each later round (for partial results)."""
    cases = ordered_cases(model_name, implementations, args)
    report_progress = (lambda: on_progress([case.snapshot() for case in cases])) if on_progress else (lambda: None)
    steps: Dict[str, TrainingStep] = {}
    build_errors: Dict[str, str] = {}

    def step_for(impl: Implementation) -> Optional[TrainingStep]:
        if impl.name not in steps and impl.name not in build_errors:
            try:
                steps[impl.name] = build_step(model_name, impl, args, requested)
            except Exception as err:
                build_errors[impl.name] = error_text(err)
                free_memory(args.device)
        return steps.get(impl.name)

    stopped: Optional[Stopped] = None
    lowest = min(args.keep_rates)
    try:
        for round_index, iters in enumerate(round_sizes(args.iters, args.rounds)):
            round_started, timed = time.perf_counter(), 0
            # Round 1 in timing order (the targets first); each later round starts one case further on, so
            # that no case always runs right after the same neighbour (on a CPU the case after a model
            # switch runs measurably slower: position in the round would bias the comparison).
            shift = round_index % len(cases) if round_index else 0
            for case in cases[shift:] + cases[:shift]:
                if budget.spent():
                    break
                if case.result["error"] is not None:
                    continue
                if (case.impl.name not in steps and case.impl.name not in build_errors
                        and budget.left() < BUILD_RESERVE_S):
                    continue  # a model build and its compilation would not fit: written as not measured
                block_started = time.perf_counter()
                step = step_for(case.impl)
                if step is None:
                    case.result["error"] = f"building the model failed: {build_errors[case.impl.name]}"
                else:
                    time_block(case, step, warmup=args.warmup if round_index == 0 else 0, iters=iters, args=args,
                               requested=requested,
                               host_timed=case.keep_rate == lowest and case.impl.name in HOST_TIMED)
                    timed += 1
                if round_index == 0:
                    progress.first_round(case, time.perf_counter() - block_started)
                    report_progress()
            if round_index > 0 and timed:
                progress.round_done(model_name, round_index + 1, args.rounds, timed,
                                    time.perf_counter() - round_started)
                report_progress()
            if budget.spent():
                break
    except Stopped as err:  # the CUDA context was lost, or SIGTERM: the rest is not measured
        stopped = err
    try:
        for case in cases:
            if case.result["error"] is None and not case.samples_ms:
                case.result["error"] = f"not measured: {stopped}" if stopped else budget.skip_reason()
                progress.first_round(case, 0.0)
        results = [case.finish() for case in cases]
        steps.clear()
        free_memory(args.device)
    except Stopped as err:  # SIGTERM during this bookkeeping: run() falls back on the last partial save
        raise Stopped(str(stopped or err)) from err
    if stopped:
        raise Stopped(str(stopped), results)
    return results


def add_ratios(results: List[dict]) -> None:
    """ratio_vs_rho1: over the same implementation at rho = 1; ratio_vs_baseline: over the plain ViT."""
    def median(model, impl, keep_rate):
        return next((r["median_ms"] for r in results if r["model"] == model and r["impl"] == impl
                     and r["keep_rate"] == keep_rate and r["median_ms"] is not None), None)

    for result in results:
        if result["median_ms"] is None:
            continue
        full = median(result["model"], result["impl"], 1.0)
        baseline = median(result["model"], BASELINE.name, 1.0)
        result["ratio_vs_rho1"] = result["median_ms"] / full if full else None
        result["ratio_vs_baseline"] = result["median_ms"] / baseline if baseline else None


# ----------------------------------------------------------------------------- projection

@functools.lru_cache(maxsize=None)
def schedule_shares(spec: str, total_steps: int, steps_per_epoch: int) -> Tuple[str, Dict[float, float], int]:
    """(repr, {rho: share of steps}, steps it runs) of a schedule: a pass over every step (about 1M for
    ImageNet at 100 epochs), done once, not at every partial save of the report."""
    schedule = build_schedule(spec, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    return repr(schedule), schedule.shares(), schedule.total_steps


def project(results: List[dict], args, impls: List[str]) -> dict:
    """Epoch and run time of each implementation under each schedule (see pss_kernels/train/timing.py)."""
    models = {}
    for model_name in args.models:
        batch = args.batch_sizes[model_name]
        per_epoch = steps_per_epoch(args.dataset_images, batch)
        total = args.epochs * per_epoch
        baseline_ms = next((r["median_ms"] for r in results if r["model"] == model_name
                            and r["impl"] == BASELINE.name and r["median_ms"] is not None), None)
        baseline = (project_run({1.0: 1.0}, {1.0: baseline_ms}, baseline_ms, steps_per_epoch=per_epoch,
                                total_steps=total) if baseline_ms else None)
        block = {"batch_size": batch, "steps_per_epoch": per_epoch, "total_steps": total,
                 "baseline": baseline, "schedules": []}
        for spec in args.schedules:
            described, shares, schedule_steps = schedule_shares(spec, total, per_epoch)
            # sum rho * share is schedule.mean_keep_rate() without a second pass over every step.
            entry = {"spec": spec, "schedule": described,
                     "mean_keep_rate": sum(rho * share for rho, share in shares.items()),
                     "shares": {f"{rho:g}": share for rho, share in shares.items()}, "impls": {}}
            for impl in impls:
                times = {r["keep_rate"]: r["median_ms"] for r in results
                         if r["model"] == model_name and r["impl"] == impl and r["median_ms"] is not None}
                try:
                    if not times:
                        raise ValueError("no keep rate was measured")
                    # A schedule may fix its own length (budget:...): project the steps it actually runs.
                    entry["impls"][impl] = project_run(shares, times, baseline_ms, steps_per_epoch=per_epoch,
                                                       total_steps=schedule_steps, baseline_steps=total)
                except ValueError as err:
                    entry["impls"][impl] = {"error": str(err)}
            block["schedules"].append(entry)
        models[model_name] = block
    return {"dataset": "ImageNet-1k" if args.dataset_images == IMAGENET_1K_TRAIN_IMAGES else "custom dataset",
            "dataset_images": args.dataset_images, "epochs": args.epochs, "gpus": 1, "models": models}


# ----------------------------------------------------------------------------- main

def run_kind(args) -> str:
    """"gpu" (a GPU result: targets judged, written to benchmarks/results), "cpu" (the CPU default)
    or "<device>-smoke" (the tiny configuration)."""
    if args.smoke:
        return f"{args.device.type}-smoke"
    return "gpu" if args.device.type == "cuda" else "cpu"


RUN_LABELS = {"gpu": "GPU run", "cpu": "CPU run (not a GPU result)",
              "cpu-smoke": "CPU smoke run (tiny configuration: checks the harness, not a performance figure)",
              "cuda-smoke": "GPU smoke run (tiny configuration)"}


def run_label(args) -> str:
    return RUN_LABELS[run_kind(args)]


def run(args) -> dict:
    """Measure every case and return the run's JSON document."""
    requested = requested_backends(args)
    label = run_label(args)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the patch-embedding convolution, as training scripts set it
    env = environment_info(args.device)
    print(f"{label} on {env['device']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}",
          file=sys.stderr)
    print(f"pss backends requested: {requested} (None = the package's choice)", file=sys.stderr, flush=True)
    unavailable = unavailable_implementations(args.impls, args.device)
    for impl_name, reason in unavailable.items():
        print(f"{impl_name}: not measured, it cannot train on {args.device.type} here: {reason}", file=sys.stderr,
              flush=True)
    impls = [impl_name for impl_name in args.impls if impl_name not in unavailable]
    progress = Progress(len(args.models) * (1 + len(impls) * len(args.keep_rates)))
    budget = TimeBudget(args.time_budget)
    budget.started = PROCESS_STARTED  # imports, CUDA start and the environment count against it too
    report = {
        "benchmark": "iter_time",
        "run_kind": run_kind(args),
        "label": label,
        "complete": False,  # until every case is measured: the file is written as the run goes
        "environment": env,
        "config": {"models": args.models, "img_size": args.img_size, "batch_sizes": args.batch_sizes,
                   "keep_rates": args.keep_rates, "impls": impls, "warmup": args.warmup, "iters": args.iters,
                   "rounds": args.rounds, "interleaved": args.rounds > 1,
                   "amp": "bf16 autocast" if args.amp == "bf16" else "float32", "adamw": args.adamw,
                   "compile": args.compile,
                   "optimizer": f"AdamW(lr=1e-4, weight_decay=0.05, {args.adamw})", "num_classes": NUM_CLASSES,
                   "time_budget_s": args.time_budget, "elapsed_s": None,
                   "cudnn_benchmark": args.device.type == "cuda",
                   "pss_backends_requested": requested, "schedules": args.schedules,
                   "command": " ".join(["iter_time.py", *args.argv])},
        "implementations": {impl.name: impl.description for impl in [*IMPLEMENTATIONS.values(), BASELINE]},
        "unavailable": unavailable,
        "results": [],
    }
    json_path = output_paths(report, args.out_dir)[0]
    results: List[dict] = []

    def summarize(records: List[dict], complete: bool) -> None:
        """The report's ratios, errors, projection and targets from `records`: every partial file has
        them too, so a run killed by its stage limit still says which targets were judged."""
        add_ratios(records)
        report.update(complete=complete, results=records,
                      errors=[{k: r[k] for k in ("model", "impl", "keep_rate", "error")} for r in records
                              if r["error"]])
        report["config"]["elapsed_s"] = round(budget.elapsed(), 1)
        report["projection"] = project(records, args, impls)
        report["targets"] = evaluate_targets(report) if report["run_kind"] == "gpu" else []

    latest: Dict[str, List[dict]] = {}  # the current model's records as last saved

    def save_partial(records: List[dict]) -> None:
        latest["records"] = [dict(record) for record in records]
        summarize(results + latest["records"], complete=False)
        write_json(report, json_path)

    def not_measured(model_name: str, reason: str) -> List[dict]:
        return [dict(new_result(model_name, impl, keep_rate, args), error=f"not measured: {reason}")
                for impl in [BASELINE] + [IMPLEMENTATIONS[name] for name in impls]
                for keep_rate in ([1.0] if impl is BASELINE else args.keep_rates)]

    stopped = None
    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        try:
            # flex compiles once per keep rate and model (static shapes): past dynamo's default limit it
            # would silently run unfused; with this it raises instead, and the case records the error.
            with dynamo_recompile_limit(FLEX_RECOMPILE_LIMIT):
                for model_name in args.models:
                    if stopped:
                        results += not_measured(model_name, str(stopped))
                        continue
                    latest.clear()
                    try:
                        results += run_model(model_name, [BASELINE] + [IMPLEMENTATIONS[name] for name in impls],
                                             args, requested, progress, budget, on_progress=save_partial)
                    except Stopped as err:
                        stopped = err
                        # Its records, or where the stop came during run_model's own bookkeeping, those of
                        # its last partial save (none saved yet: every case not measured).
                        results += (err.args[1] if len(err.args) > 1 else
                                    latest.get("records") or not_measured(model_name, str(err)))
                        print(f"stopped: {err}", file=sys.stderr, flush=True)
        except Stopped as err:  # between two models, or leaving the recompile limit
            stopped = stopped or err
        # The final write is not interrupted: a SIGTERM from here on is ignored (SIGKILL follows 10 s later).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if stopped:
            for record in results:  # a partial save's cases that were still waiting for their turn
                if record["error"] is None and record["median_ms"] is None:
                    record["error"] = f"not measured: {stopped}"
        budget_cut = budget.seconds is not None and any(record["error"] == budget.skip_reason()
                                                        for record in results)
        summarize(results, complete=stopped is None and not budget_cut)
        if stopped:
            report["stopped"] = str(stopped)
        write_json(report, json_path)  # before any profiling or plotting: a kill from here on keeps the verdicts
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    missed = any(target["status"] == "MISS" for target in report["targets"])
    if stopped:  # no profile on a lost context, nor after SIGTERM
        return report
    if args.profile:
        report["profiles"] = profile_lowest_keep_rate(args.models, args, requested)
    elif missed and budget.left() < PROFILE_RESERVE_S:
        print("a target was missed, but too little of the time budget is left: no profile", file=sys.stderr,
              flush=True)
    elif missed:
        # Issue 5: a missed target comes with where the time goes.
        print("a target was missed: profiling one pss iteration", file=sys.stderr, flush=True)
        report["profiles"] = profile_lowest_keep_rate([TARGET_MODEL], args, requested)
    if "profiles" in report:
        write_json(report, json_path)  # the profile kept before plotting (a first matplotlib import is slow)
    return report


def profile_lowest_keep_rate(model_names: List[str], args, requested) -> Dict[str, str]:
    """Profiler table of one pss iteration at the lowest keep rate, per model."""
    profiles = {}
    keep_rate = min(args.keep_rates)
    for model_name in model_names:
        step = None
        try:
            step = build_step(model_name, IMPLEMENTATIONS["pss"], args, requested)
            step.model.keep_rate = keep_rate
            profiles[model_name] = profile_step(step, device=args.device, warmup=max(args.warmup, 1))
        except Exception as err:
            profiles[model_name] = f"profiling failed: {error_text(err)}"
        del step
        free_memory(args.device)
    return profiles


def output_paths(report: dict, out_dir: Path) -> Tuple[Path, Path]:
    """(JSON, PNG) paths of a run: named by device (or run kind) and the run's start."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = report["environment"]
    stem = (f"iter_time_{file_slug(env['device'] if env['device_type'] == 'cuda' else report['run_kind'])}_"
            f"{env['date'][:19].replace(':', '').replace('-', '')}")
    return out_dir / f"{stem}.json", out_dir / f"{stem}.png"


def write_json(report: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a run killed mid-write keeps the previous version."""
    scratch = path.with_suffix(".json.partial")
    scratch.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(scratch, path)


def write_outputs(report: dict, out_dir: Path) -> Dict[str, Optional[Path]]:
    json_path, png_path = output_paths(report, out_dir)
    skipped = plot_report(report, png_path)
    report["plot"] = None if skipped else png_path.name
    if skipped:
        report["plot_skipped"] = skipped
    write_json(report, json_path)
    return {"json": json_path, "png": None if skipped else png_path, "plot_skipped": skipped}


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    # The tables first (the session log keeps them), then the plot, whose first matplotlib import on a
    # fresh machine builds its font cache.
    print(f"\n=== {report['label']} ===")
    if report.get("stopped"):
        print(f"STOPPED: {report['stopped']}; the cases not timed before are written as not measured\n")
    if report["unavailable"]:
        print(format_unavailable(report) + "\n")
    print(format_timing_table(report))
    print(format_projection_table(report))
    if report["targets"]:
        print("\n" + format_targets(report["targets"]))
    elif report["run_kind"] == "gpu":
        print("\nTargets: not evaluated (they are for vit_base at 224)")
    if report["errors"]:
        print("\n" + format_errors(report))
    for model_name, text in report.get("profiles", {}).items():
        print(f"\nProfile of one pss iteration, {model_name} at rho={min(args.keep_rates):g}:\n{text}")
    sys.stdout.flush()
    paths = write_outputs(report, args.out_dir)
    print(f"\nJSON: {paths['json'].resolve()}")
    print(f"PNG:  {paths['png'].resolve()}" if paths["png"] else f"PNG:  not written: {paths['plot_skipped']}")
    if report["run_kind"] != "gpu":
        print(f"({report['label']}: written under {args.out_dir}, not benchmarks/results/, which holds GPU results)")
    return report


if __name__ == "__main__":
    main()
