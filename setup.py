"""Builds pss_kernels._C from csrc/ with CMake + nvcc + pybind11 when it can.

No nvcc (or PSS_KERNELS_SKIP_CUDA=1) is not an error: the package installs without _C,
prints one line saying why, and records the reason in pss_kernels/_build_info.json so that
`pss_kernels.available_backends()` can repeat it at run time.

Environment:
  PSS_KERNELS_SKIP_CUDA=1        do not build the CUDA extension
  PSS_KERNELS_CUDA_ARCHS="80;90" CUDA architectures to compile for (CMake syntax)
  CUDA_HOME / CUDA_PATH          where to look for nvcc if it is not on PATH
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;90"


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _tell_user(line):
    """Print `line`, and also to the terminal: pip captures a build's output and shows it only
    with -v or on failure, yet the user should learn at install time that _C was skipped."""
    print(line, flush=True)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:  # no terminal (CI, a notebook): the captured line and _build_info.json remain
        pass


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        for ext in self.extensions:
            self.build_cmake(ext)

    def _write_build_info(self, ext, info):
        # Next to the extension, so both `pip install .` and `pip install -e .` carry it.
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "_build_info.json").write_text(json.dumps(info, indent=1) + "\n")

    def _skip(self, ext, reason):
        _tell_user(f"pss_kernels: CUDA backend skipped: {reason}")
        self._write_build_info(ext, {"cuda_built": False, "reason": reason})

    def build_cmake(self, ext):
        if os.environ.get("PSS_KERNELS_SKIP_CUDA", "0") not in ("", "0"):
            return self._skip(ext, "PSS_KERNELS_SKIP_CUDA is set")
        nvcc = find_nvcc()
        if nvcc is None:
            return self._skip(ext, "nvcc was not found at install (PATH, CUDA_HOME, CUDA_PATH)")
        cmake = shutil.which("cmake")
        if cmake is None:
            return self._skip(ext, "cmake was not found at install")
        import pybind11

        archs = os.environ.get("PSS_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        config = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_path.parent}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPSS_KERNELS_CUDA_ARCHS={archs}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            config.append("-GNinja")
        jobs = str(max(1, os.cpu_count() or 1))
        print(f"pss_kernels: building the CUDA backend with {nvcc} for archs {archs}", flush=True)
        try:
            subprocess.run([cmake, str(ROOT), *config], cwd=build_temp, check=True)
            subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)
        except subprocess.CalledProcessError as err:
            # A compiler that exists but fails is a real error in csrc/: do not hide it.
            raise RuntimeError(f"pss_kernels: building the CUDA extension failed ({err})") from err
        self._write_build_info(ext, {"cuda_built": True, "nvcc": nvcc, "cuda_archs": archs})


setup(ext_modules=[CMakeExtension("pss_kernels._C")], cmdclass={"build_ext": CMakeBuild})
