"""Every code block of README.md runs, so that the README cannot drift from the code.

```python blocks are executed as they are (they use small shapes already). ```bash blocks are
run line by line in a scratch directory holding a tiny JPEG folder at `data/my_images`, with the
long runs shrunk: pss-train / torchrun get a tiny model, one epoch and small batches appended
(argparse takes the last value of a flag), pss-evaluate a few images, iter_time.py `--smoke`.
Three commands are not run here, each for a stated reason (SKIPPED_COMMANDS); any other command
the test does not know fails it, so a new README command must be taught here first.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
TINY_MODEL = ["--model", "deit_tiny", "--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "2",
              "--num-heads", "2", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--workers", "0",
              "--no-progress"]
SKIPPED_COMMANDS = {
    "pip install": "the install itself: CI runs the README's test command verbatim (.ci/run)",
    "python -m pytest": "the test suite this test belongs to",
    "bash benchmarks/gpu_session.sh": "needs a GPU; CI runs its --rehearse variant",
}


def blocks(language):
    return [code for lang, code in BLOCK.findall(README.read_text()) if lang == language]


def test_readme_has_python_and_shell_blocks():
    assert len(blocks("python")) >= 4 and len(blocks("bash")) >= 3


@pytest.mark.parametrize("number", range(len(blocks("python"))))
def test_python_block_runs(number):
    code = blocks("python")[number]
    exec(compile(code, f"README.md python block {number}", "exec"), {"__name__": f"readme_block_{number}"})


def make_image_folder(root: Path, per_class: int = 12):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")


def runnable(command: str):
    """The argv that runs `command` here (shrunk), or None with the reason it is skipped."""
    for prefix, reason in SKIPPED_COMMANDS.items():
        if command.startswith(prefix):
            return None, reason
    argv = shlex.split(command)
    if argv[0] == "pss-train":
        return [sys.executable, "-m", "pss_kernels.train", *argv[1:], *TINY_MODEL], None
    if argv[0] == "pss-evaluate":
        return [sys.executable, "-m", "pss_kernels.evaluate", *argv[1:], "--max-images", "8", "--device", "cpu",
                "--workers", "0", "--num-pictures", "1", "--keep-rates", "1.0,0.5"], None
    if argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:], *TINY_MODEL], None
    if argv[:2] == ["python", "benchmarks/iter_time.py"]:
        return [sys.executable, str(REPO / "benchmarks" / "iter_time.py"), *argv[2:], "--smoke", "--epochs", "1"], None
    raise AssertionError(f"README command the test does not know how to run: {command!r}")


def test_shell_blocks_run(tmp_path):
    make_image_folder(tmp_path / "data" / "my_images")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    ran = []
    for block in blocks("bash"):
        for line in block.strip().splitlines():
            for command in (part.strip() for part in line.split("&&")):
                argv, reason = runnable(command)
                if argv is None:
                    continue
                done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
                ran.append(command.split()[0])
    assert {"pss-train", "pss-evaluate", "torchrun", "python"} <= set(ran)
    assert (tmp_path / "runs" / "digits" / "checkpoint.pt").is_file()
    assert any((tmp_path / "runs" / "digits" / "eval").iterdir())
