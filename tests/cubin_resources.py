"""Registers and spill bytes of a Triton-compiled kernel, read without a GPU with the cuobjdump that
ships in Triton's NVIDIA backend. Used by the codegen tests' subprocess scripts (run from the
repository root with tests/ on sys.path)."""
import os
import subprocess
import tempfile

import triton

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(compiled):
    """{"registers": int, "stack_bytes": int} of a `triton.compile` result, or None without cuobjdump
    (the tests then fail: they require the report)."""
    if not os.path.exists(CUOBJDUMP):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(item.split(":", 1) for item in usage.split() if item.startswith(("REG:", "STACK:")))
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"])}
