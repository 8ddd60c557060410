"""Read the GPU code of the Triton kernels without a GPU, as the JIT would compile it.

`capture_launches()` replaces JITFunction.run for the duration, so calling a real launcher
(e.g. rpb_attention_forward) with CPU tensors records each `kernel[grid](*args, **kwargs)` instead
of running it. `compile_like_jit(launch, arch)` then compiles that launch for a CUDA target with the
JIT's own argument specialisation (triton.runtime.jit's binder and _pack_args: pointers and ints
divisible by 16 marked, ints equal to 1 folded into constants), so registers, spills and layouts
are those of the code that runs, not of a hand-written all-i32 signature.

Needs TRITON_INTERPRET unset (kernels decorated as JITFunction): the codegen tests run it in a
subprocess (tests/codegen_report.py). Used from tests/ on sys.path.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from typing import List, NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class Launch(NamedTuple):
    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@contextlib.contextmanager
def capture_launches():
    """Record every Triton kernel launch made inside the block (nothing runs)."""
    launches: List[Launch] = []
    real_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), tuple(grid)))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = real_run


def specialisation(launch: Launch, arch: int = 90):
    """(options, signature, constexprs, attrs) exactly as JITFunction.run derives them for a launch."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    kwargs = dict(launch.kwargs)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    return launch.kernel._pack_args(backend, kwargs, bound_args, specialization, options)


def compile_like_jit(launch: Launch, arch: int = 90):
    options, signature, constexprs, attrs = specialisation(launch, arch)
    return triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options=options.__dict__)


def resource_usage(compiled) -> dict:
    """{"registers": int, "stack_bytes": int} of a compiled kernel, read with the cuobjdump that ships
    in Triton's NVIDIA backend (raises if it is missing: the codegen tests need the figures)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(item.split(":", 1) for item in usage.split() if item.startswith(("REG:", "STACK:")))
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"])}


_MMA_LAYOUT = re.compile(r"^(#\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+), versionMinor = \d+, "
                         r"warpsPerCTA = \[(\d+), (\d+)\], instrShape = \[(\d+), (\d+)(?:, \d+)?\]", re.M)
_DOT = re.compile(r"(?:ttng\.warp_group_dot|tt\.dot) .*-> tensor<(\d+)x(\d+)x\w+, (#\w+)>")


def replicated_dots(ttgir: str) -> List[dict]:
    """Tensor-core dots whose warps cover more rows or columns than the dot has: those warps compute
    the same elements again (e.g. warpsPerCTA = [8, 1] of 16-row warp tiles on a 64-row tile)."""
    layouts = {m.group(1): tuple(int(g) for g in m.groups()[1:]) for m in _MMA_LAYOUT.finditer(ttgir)}
    found = []
    for match in _DOT.finditer(ttgir):
        rows, cols, name = int(match.group(1)), int(match.group(2)), match.group(3)
        if name not in layouts:  # an FMA dot (blocked layout): no warp tiles
            continue
        version, warps_m, warps_n, instr_m, instr_n = layouts[name]
        if warps_m * instr_m > rows or warps_n * instr_n > cols:
            found.append({"shape": [rows, cols], "warps": [warps_m, warps_n], "instr": [instr_m, instr_n],
                          "mma_version": version})
    return found


_ROW_OFFSET_I32 = re.compile(r"tt\.addptr .*: tensor<\d+x1x!tt\.ptr<(?:bf16|f16)>, #\w+>, tensor<\d+x1xi32")


def int32_row_offsets(ttgir: str) -> int:
    """How many (rows x 1) tensors of fp16/bf16 pointers get int32 row offsets (row index * row stride
    computed in 32 bits, which overflows for sequence-major layouts at large B * n)."""
    return len(_ROW_OFFSET_I32.findall(ttgir))


def ptxas_release(arch: int) -> str:
    """The release ("12.8") of the ptxas that Triton assembles `arch` with. Registers and spills are its
    choice: the same PTX keeps 8 bytes on the stack with ptxas 12.9 and none with 12.8 or 13.4."""
    from triton.backends.nvidia.compiler import get_ptxas_version
    match = re.search(r"release (\d+\.\d+)", get_ptxas_version(arch))
    return match.group(1) if match else "unknown"


def count_instructions(ptx: str, mnemonic: str) -> int:
    return len(re.findall(re.escape(mnemonic) + r"\b", ptx))


def run_codegen_report(op: str, timeout: int = 1200, parts: int = 0) -> List[dict]:
    """tests/codegen_report.py for `op` in subprocesses without the interpreter; their JSON reports
    joined. The cases are dealt out to `parts` processes (default: one per CPU, at most 4) that compile
    side by side: a fresh Triton cache compiles a few hundred kernels."""
    import json
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns without it; 3.6's default, explicitly
    # The package from this checkout, installed or not (a script's sys.path starts at its own folder).
    repo = os.path.dirname(here)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    parts = parts or max(1, min(4, os.cpu_count() or 1))
    runs = [subprocess.Popen([sys.executable, os.path.join(here, "codegen_report.py"), op, f"{part}/{parts}"],
                             cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for part in range(parts)]
    report = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=timeout)
        if run.returncode != 0:
            raise AssertionError(f"codegen_report.py {op} failed:\n{stderr[-4000:]}")
        report += json.loads(stdout.strip().splitlines()[-1])
    return report
