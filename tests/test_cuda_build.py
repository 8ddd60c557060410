"""The CUDA build keeps IEEE float semantics. With --use_fast_math, nvcc flushes subnormals to zero
(abs.ftz, add.ftz), so the cuda backend's scores would rank tiny values differently from torch and
Triton. This test compiles every csrc/ CUDA source to sm_90 PTX with the nvcc options that
CMakeLists.txt passes, read from CMakeLists.txt, and checks that no instruction flushes to zero.
It needs nvcc only, no GPU."""
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))
# What CMakeLists.txt's one target_compile_options call must look like: every nvcc option of the
# build then sits in PSS_KERNELS_CUDA_FLAGS, where this test reads them.
OPTIONS_CALL = "target_compile_options(_C PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${PSS_KERNELS_CUDA_FLAGS}>)"
# setup.py configures CMAKE_BUILD_TYPE=Release, which adds CMake's default CMAKE_CUDA_FLAGS_RELEASE.
RELEASE_FLAGS = ["-O3", "-DNDEBUG"]
FLOAT32_INSTRUCTION = re.compile(r"\b(?:abs|add|sub|mul|fma)(?:\.\w+)*\.f32\b")


def find_nvcc():
    """nvcc as setup.py looks for it: CUDA_HOME, CUDA_PATH, then PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cmake_cuda_options():
    """The nvcc options CMakeLists.txt gives every CUDA source (PSS_KERNELS_CUDA_FLAGS, the CUDA
    standard), after checking that no other call or variable adds CUDA options behind them."""
    text = re.sub(r"#[^\n]*", "", (ROOT / "CMakeLists.txt").read_text())  # no '#' inside its strings
    flags = re.findall(r"\bset\(\s*PSS_KERNELS_CUDA_FLAGS\s+([^)]*)\)", text)
    assert len(flags) == 1, "CMakeLists.txt must set PSS_KERNELS_CUDA_FLAGS once"
    option_calls = [" ".join(call.split()) for call in re.findall(r"\w*compile_options\s*\([^)]*\)", text)]
    assert option_calls == [OPTIONS_CALL], (
        f"CUDA options must reach nvcc through PSS_KERNELS_CUDA_FLAGS only (this test compiles with them); "
        f"found {option_calls}")
    for source in ("CMakeLists.txt", "setup.py"):
        assert "CMAKE_CUDA_FLAGS" not in (ROOT / source).read_text(), (
            f"{source} sets CMAKE_CUDA_FLAGS: put CUDA options in PSS_KERNELS_CUDA_FLAGS")
    standard = re.search(r"\bset\(\s*CMAKE_CUDA_STANDARD\s+(\d+)\s*\)", text)
    assert standard, "CMakeLists.txt must set CMAKE_CUDA_STANDARD"
    return [*RELEASE_FLAGS, *shlex.split(flags[0]), f"-std=c++{standard.group(1)}"]


def test_cmake_sets_cuda_options_in_one_place():
    options = cmake_cuda_options()
    assert "-lineinfo" in options and "-O3" in options


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_cuda_sources_compile_without_flush_to_zero(source, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, CUDA_PATH, PATH): the CUDA build's float semantics are not checked")
    ptx_path = tmp_path / (source.stem + ".ptx")
    # -I csrc: CMakeLists.txt's target_include_directories.
    command = [nvcc, "-ptx", "-arch=sm_90", *cmake_cuda_options(), "-I", str(ROOT / "csrc"), str(source),
               "-o", str(ptx_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}"
    ptx = ptx_path.read_text()
    assert ".entry" in ptx and FLOAT32_INSTRUCTION.search(ptx), "no kernel with float32 arithmetic in the PTX"
    flushing = [line.strip() for line in ptx.splitlines() if ".ftz" in line]
    assert not flushing, (f"{len(flushing)} flush-to-zero instructions in {source.name} built with "
                          f"{shlex.join(cmake_cuda_options())}, e.g. {flushing[:5]}")
