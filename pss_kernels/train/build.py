"""What `pss-train` and `pss-evaluate` both set up from a TrainConfig: the model, the data, the
training sampler, the device policy (backends, precision, determinism) and the seeding."""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
from typing import Optional

import numpy as np
import torch

from .._backends import backend_status
from ..models import create_model
from ..models.vit import VisionTransformer
from .config import TrainConfig
from .data import DataInfo, build_dataset
from .distributed import DistInfo, RepeatedAugSampler, ShardedSampler
from .optional_deps import MissingDependency
from .methods import model_options


def build_model(config: TrainConfig, info: DataInfo) -> VisionTransformer:
    """The run's model: the named config with the command line's overrides and the enabled methods'
    model options (e.g. Tri-Level's TokenPruning plan)."""
    from ..models import MODEL_CONFIGS
    overrides = {"patch_size": config.patch_size, "embed_dim": config.embed_dim, "depth": config.depth,
                 "num_heads": config.num_heads, "abs_pos_embed": config.abs_pos_embed,
                 "drop_path_rate": config.drop_path}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    if config.layer_scale_init is not None:
        overrides["layer_scale_init"] = config.layer_scale_init or None  # 0 switches layer scale off
    if config.pool is not None:
        overrides["pool"] = config.pool
    if config.allocation != "fixed":
        overrides["allocation"] = config.allocation
    depth = config.depth or MODEL_CONFIGS[config.model].depth
    return create_model(config.model, img_size=info.img_size, num_classes=info.num_classes, rpb=config.rpb,
                        attn_impl=config.attn_impl, sampler_impl=config.sampler_impl, scorer=config.scorer,
                        sampler_backend=config.sampler_backend, attn_backend=config.attn_backend,
                        deterministic=config.deterministic, **model_options(config, depth), **overrides)


def build_data(config: TrainConfig, train: bool, normalize: bool = True, device: Optional[torch.device] = None):
    """(dataset, DataInfo) of the training or validation split; on a CUDA `device` the training split
    may decode on the GPU (info.gpu_decoder; see build_device_images)."""
    return build_dataset(config.data, train=train, img_size=config.img_size, data_dir=config.data_dir,
                         num_classes=config.num_classes, synthetic_size=config.synthetic_size, seed=config.seed,
                         normalize=normalize, interpolation=config.interpolation, decoder=config.decoder,
                         device=device)


def build_device_images(config: TrainConfig, info: DataInfo, device: torch.device, normalize: bool = True):
    """The training process's GPU decoding of the loader's EncodedImages (train/data/gpu_decode.py),
    or None when the training split yields pixels."""
    if info.gpu_decoder is None:
        return None
    from .data.gpu_decode import DeviceImages, make_batch_decoder
    return DeviceImages(make_batch_decoder(info.gpu_decoder, device), info.img_size, mean=info.mean, std=info.std,
                        interpolation=config.interpolation, normalize=normalize)


def init_from_pretrained(model: VisionTransformer, path: str) -> str:
    """Load `path` into `model` with models.load_pretrained(strict=False); its report's summary."""
    try:
        from ..models import load_pretrained
    except ImportError as err:
        raise MissingDependency(f"--init-from needs pss_kernels.models.load_pretrained ({err})") from None
    return load_pretrained(model, path, strict=False).summary()


def build_sampler(config: TrainConfig, dist_info: DistInfo, num_samples: int) -> ShardedSampler:
    """The training sampler: DeiT's repeated augmentation with --repeated-aug > 1, else plain sharding."""
    if config.repeated_aug > 1:
        return RepeatedAugSampler(num_samples, rank=dist_info.rank, world_size=dist_info.world_size,
                                  repeats=config.repeated_aug, seed=config.seed)
    return ShardedSampler(num_samples, rank=dist_info.rank, world_size=dist_info.world_size, shuffle=True,
                          seed=config.seed)


def check_backend_flag(flag: str, backend: Optional[str], device: torch.device) -> None:
    """ValueError (one line, naming the flag and the reason) when `backend` cannot run on `device`."""
    if backend is not None:
        status = backend_status(backend, device)
        if not status.available:
            raise ValueError(f"{flag} {backend} cannot run on {device}: {status.reason}")


def check_backends(config: TrainConfig, device: torch.device) -> None:
    """Refuse an unusable --sampler-backend / --attn-backend before any data or model is built."""
    check_backend_flag("--sampler-backend", config.sampler_backend, device)
    check_backend_flag("--attn-backend", config.attn_backend, device)


def autocast_dtype_for(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 with --precision bf16, or auto on CUDA; None (float32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


DETERMINISTIC_CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """With enabled: torch.use_deterministic_algorithms(True, warn_only=True) and cudnn.benchmark off
    for the block (restored after). torch then picks deterministic kernels (cuDNN convolutions,
    SDPA, scatters) and warns about any op that has none (a run that warns is not bit-exact).
    cuBLAS needs CUBLAS_WORKSPACE_CONFIG for that; it is set to :4096:8 unless already set."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def parameters_sha256(model: torch.nn.Module) -> str:
    """Digest of every parameter's bytes, in order: equal digests = bit-identical weights."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


MAX_COMPILED_KEEP_RATES = 16


def raise_recompile_limit(distinct_keep_rates: int) -> None:
    """Each keep rate is a different token count, hence one compiled graph per rate (training only:
    evaluation runs the eager module). A continuous schedule (unquantised warmup_cosine) has
    thousands of rates: past the cap dynamo runs the new ones eagerly instead of compiling forever."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), min(distinct_keep_rates + 2, MAX_COMPILED_KEEP_RATES)))
