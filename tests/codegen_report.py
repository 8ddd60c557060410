"""Compile every Triton kernel variant the launchers make at the shapes that train a ViT, for sm_90
(H100/H200) and sm_80 (A100), as the JIT would (tests/jit_codegen.py), and print one JSON report.

    TRITON_INTERPRET=0 python tests/codegen_report.py rpb_attention|sample_patches [i/n]

Each entry: op, kernel, arch, dtype, shape, variant, the launch grid, the tile constexprs,
registers and spill (stack) bytes with the ptxas release that chose them, tensor-core dots whose
warps repeat work, fp16/bf16 row offsets computed in int32, and the wgmma count. Identical
compilations (same kernel, specialisation and options) are compiled once per process; with `i/n` it
reports every n-th case from the i-th, so n processes can share the work. The codegen tests (test_rpb_attention.py, test_sample_patches.py)
run this in subprocesses (jit_codegen.run_codegen_report), because their own process runs Triton
in the interpreter.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jit_codegen import (capture_launches, compile_like_jit, count_instructions, int32_row_offsets,  # noqa: E402
                         ptxas_release, replicated_dots, resource_usage, specialisation)

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_compiled = {}


@contextmanager
def environment(name, value):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name)
        else:
            os.environ[name] = saved


def describe(launch, arch, **labels):
    """One report entry for a captured launch (compiling it unless an identical one was)."""
    options, signature, constexprs, attrs = specialisation(launch, arch)
    key = (launch.name, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
    if key not in _compiled:
        compiled = compile_like_jit(launch, arch)
        _compiled[key] = dict(resource_usage(compiled), replicated_dots=replicated_dots(compiled.asm["ttgir"]),
                              int32_row_offsets=int32_row_offsets(compiled.asm["ttgir"]),
                              wgmma=count_instructions(compiled.asm["ptx"], "wgmma.mma_async"),
                              ptxas=ptxas_release(arch))
    tiles = {name: value for name, value in launch.kwargs.items() if name.startswith("BLOCK") or name == "num_warps"}
    folded = sorted(name for name, kind in signature.items() if kind == "constexpr" and name not in launch.kwargs)
    meta = {name: value for name, value in launch.kwargs.items() if isinstance(value, (bool, int, str))}
    return dict(labels, kernel=launch.name, arch=arch, grid=list(launch.grid), tiles=tiles, meta=meta,
                folded_args=folded, **_compiled[key])


# ----------------------------------------------------------------------------- rpb_attention

RPB_CASES = [  # (arch, dtype, head dim, kept tokens n): ViT at 224 (14 x 14 grid), rho 0.2 / 0.4 / 1
    *[(90, torch.bfloat16, head_dim, n) for head_dim in (32, 64, 128) for n in (39, 79, 197)],
    (90, torch.float16, 64, 197),
    *[(90, torch.float32, head_dim, n) for head_dim in (64, 128) for n in (39, 197)],
    (80, torch.bfloat16, 64, 197),
]
# Backward variants: (name, PSS_KERNELS_RPB_DBIAS, deterministic, bias_grad); auto is image-sum at
# index=None and the position grid with an index; deterministic is image-sum / csr.
BACKWARD_VARIANTS = [
    ("backward", "auto", False, True), ("backward frozen table", "auto", False, False),
    ("backward deterministic", "auto", True, True), ("backward deterministic slices", "slices", True, True),
    ("backward slices", "slices", False, True), ("backward position-grid", "position-grid", False, True),
    ("backward csr", "csr", False, True),
]


def rpb_attention_report(part="0/1", batch=256, heads=12):
    from pss_kernels.ops.rpb_attention import triton_backward, triton_common, triton_forward
    from pss_kernels.ops.rpb_attention.reference import bias_table_rows
    grid_size, num_positions = (14, 14), 197
    report = []
    for arch, dtype, head_dim, num_tokens in share(RPB_CASES, part):
        qkv = torch.empty(batch, num_tokens, 3, heads, head_dim, dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # views of one qkv tensor, as a model makes them
        table = torch.empty(bias_table_rows(grid_size), heads)
        index = None if num_tokens == num_positions else torch.zeros(batch, num_tokens, dtype=torch.int64)
        out = torch.empty(batch, num_tokens, heads, head_dim, dtype=dtype).permute(0, 2, 1, 3)
        lse = torch.empty(batch, heads, num_tokens)
        cls_attention = torch.empty(batch, num_tokens)
        labels = dict(op="rpb_attention", dtype=TYPES[dtype], head_dim=head_dim, num_tokens=num_tokens,
                      batch=batch, heads=heads, has_index=index is not None)
        for variant, cls in (("forward", False), ("forward+cls", True)):
            with capture_launches() as launches:
                triton_forward.rpb_attention_forward(q, k, v, table, index, grid_size, 1, head_dim ** -0.5, out, lse,
                                                     cls_attention if cls else None)
            report += [describe(launch, arch, variant=variant, **labels) for launch in launches]
        for variant, accumulator, deterministic, bias_grad in BACKWARD_VARIANTS:
            with capture_launches() as launches, environment("PSS_KERNELS_RPB_DBIAS", accumulator):
                triton_backward.rpb_attention_backward(out, q, k, v, table, index, out, lse, grid_size, 1,
                                                       head_dim ** -0.5, deterministic, bias_grad)
            report += [describe(launch, arch, variant=variant, **labels) for launch in launches]
        if (arch, dtype, index) == (90, torch.bfloat16, None) and head_dim in (32, 64):
            # A tile the forward had before (evidence that the checks below see what they claim): at D = 64
            # (64, 64, 8), whose second warpgroup repeated the first's rows; at D = 32 (32, 32, 4).
            former = {64: (64, 64, 8), 32: (32, 32, 4)}[head_dim]
            table_entries, key = triton_common.tile_table("forward", head_dim, dtype, num_tokens)
            saved, table_entries[key] = table_entries[key], former
            try:
                with capture_launches() as launches:
                    triton_forward.rpb_attention_forward(q, k, v, table, None, grid_size, 1, head_dim ** -0.5, out,
                                                         lse, None)
            finally:
                table_entries[key] = saved
            (launch,) = launches
            launch.kwargs.update(BLOCK_M=former[0], BLOCK_N=former[1], num_warps=former[2])  # as launched then
            report.append(describe(launch, arch, variant=f"forward, former {former} tile", **labels))
    return report + packed_rpb_attention_report(part, batch, heads)


# Packed images (ops/varlen): the same kernels with VARLEN, B images of n tokens each packed as (T, H, D).
PACKED_CASES = [case for case in RPB_CASES if case[0] == 90 and case[3] < 197]
PACKED_BACKWARD_VARIANTS = [("packed " + name, *rest) for name, *rest in BACKWARD_VARIANTS
                            if name not in ("backward position-grid", "backward csr")]


def packed_rpb_attention_report(part="0/1", batch=256, heads=12):
    from pss_kernels.ops.rpb_attention import triton_backward, triton_forward
    from pss_kernels.ops.rpb_attention.reference import bias_table_rows
    from pss_kernels.ops.rpb_attention.triton_common import PackedSequences
    grid_size, num_positions = (14, 14), 197
    report = []
    for arch, dtype, head_dim, num_tokens in share(PACKED_CASES, part):
        total = batch * num_tokens
        qkv = torch.empty(total, 3, heads, head_dim, dtype=dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in qkv.unbind(1))  # (1, H, T, D) views, as the packed op makes
        table = torch.empty(bias_table_rows(grid_size), heads)
        positions = torch.zeros(1, total, dtype=torch.int64)
        packed = PackedSequences(torch.arange(batch + 1, dtype=torch.int32) * num_tokens, batch, num_positions)
        out = torch.empty(total, heads, head_dim, dtype=dtype).transpose(0, 1)[None]
        lse = torch.empty(1, heads, total)
        cls_attention = torch.empty(1, total)
        labels = dict(op="rpb_attention_varlen", dtype=TYPES[dtype], head_dim=head_dim, num_tokens=num_tokens,
                      batch=batch, heads=heads, has_index=True, total_tokens=total)
        for variant, cls in (("packed forward", False), ("packed forward+cls", True)):
            with capture_launches() as launches:
                triton_forward.rpb_attention_forward(q, k, v, table, positions, grid_size, 1, head_dim ** -0.5, out,
                                                     lse, cls_attention if cls else None, packed=packed)
            report += [describe(launch, arch, variant=variant, **labels) for launch in launches]
        for variant, accumulator, deterministic, bias_grad in PACKED_BACKWARD_VARIANTS:
            with capture_launches() as launches, environment("PSS_KERNELS_RPB_DBIAS", accumulator):
                triton_backward.rpb_attention_backward(out, q, k, v, table, positions, out, lse, grid_size, 1,
                                                       head_dim ** -0.5, deterministic, bias_grad, packed=packed)
            report += [describe(launch, arch, variant=variant, **labels) for launch in launches]
    return report


# ----------------------------------------------------------------------------- sample_patches

def sample_patches_report(part="0/1", batch=256):
    from pss_kernels.ops.sample_patches import triton_sample
    report = []
    cases = [  # (arch, dtype, patches P, channels C, scorer, order): ViT-B at 224 / 384 / 512, DeiT-S, 1024 px
        (90, torch.bfloat16, 196, 768, "l1", "score"), (90, torch.bfloat16, 196, 768, "l1", "spatial"),
        (90, torch.float32, 196, 384, "l2", "score"), (90, torch.bfloat16, 576, 768, "l1", "score"),
        (90, torch.float16, 1024, 768, "given", "spatial"), (90, torch.bfloat16, 4096, 768, "l1", "score"),
        (80, torch.bfloat16, 196, 768, "l1", "score"), (80, torch.bfloat16, 576, 768, "l1", "score"),
    ]
    for arch, dtype, patches, channels, scorer, order in share(cases, part):
        x = torch.empty(batch if patches < 4096 else 16, patches + 1, channels, dtype=dtype)
        scores = torch.empty(x.shape[0], patches) if scorer == "given" else None
        labels = dict(op="sample_patches", dtype=TYPES[dtype], patches=patches, channels=channels, scorer=scorer,
                      order=order, itemsize=x.element_size())
        with capture_launches() as launches:
            triton_sample.sample_patches_forward(x, scores, (patches + 1) // 2, scorer, 1, order)
            slot = torch.empty(x.shape[0], patches + 1, dtype=torch.int32)
            triton_sample.sample_patches_backward(torch.empty(x.shape[0], (patches + 1) // 2, channels, dtype=dtype),
                                                  slot, patches + 1)
        report += [describe(launch, arch, variant="forward" if i < len(launches) - 1 else "backward", **labels)
                   for i, launch in enumerate(launches)]
    packed_cases = [  # sample_patches_varlen (arch, dtype, patches P, channels C, scorer): half the tokens kept
        (90, torch.bfloat16, 196, 768, "l1"), (90, torch.bfloat16, 576, 768, "given"),
        (90, torch.bfloat16, 4096, 768, "l1"), (80, torch.bfloat16, 196, 768, "l1"),
    ]
    for arch, dtype, patches, channels, scorer in share(packed_cases, part):
        x = torch.empty(batch if patches < 4096 else 16, patches + 1, channels, dtype=dtype)
        scores = torch.empty(x.shape[0], patches) if scorer == "given" else None
        counts = torch.full((x.shape[0],), (patches + 1) // 2, dtype=torch.int64)
        total = int(counts.sum())
        labels = dict(op="sample_patches_varlen", dtype=TYPES[dtype], patches=patches, channels=channels,
                      scorer=scorer, order="score", itemsize=x.element_size())
        with capture_launches() as launches:
            triton_sample.sample_patches_varlen_forward(x, scores, counts, total, scorer, 1, "score")
            slot = torch.empty(x.shape[0], patches + 1, dtype=torch.int32)
            triton_sample.sample_patches_varlen_backward(torch.empty(total, channels, dtype=dtype), slot)
        report += [describe(launch, arch, variant="forward" if i < len(launches) - 1 else "backward", **labels)
                   for i, launch in enumerate(launches)]
    return report


def share(cases, part: str):
    """The cases of part "i/n" (every n-th from the i-th): work for one of n processes."""
    index, count = (int(value) for value in part.split("/"))
    return cases[index::count]


if __name__ == "__main__":
    op, part = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "0/1")
    print(json.dumps({"rpb_attention": rpb_attention_report, "sample_patches": sample_patches_report}[op](part)))
