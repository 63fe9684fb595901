"""Run a measurement in a fresh child process that sees the machine's accelerator, or not.

The benchmarks that compare a GPU with the CPU of the same machine run the same code twice, in
children, because a backend picks its device once per process: hiding the accelerator means
``CUDA_VISIBLE_DEVICES=`` (TensorFlow, PyTorch) and ``JAX_PLATFORMS=cpu`` (JAX) before it starts.
A child prints one JSON line last; that is what :func:`measure` returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def measure(code: str, args: list[str], hide_accelerator: bool, **environ: str) -> dict:
    """Run ``python -c code args`` with ``environ`` added to this process's environment (for
    example ``KERAS_BACKEND="jax"``) and return the JSON object its last line holds."""
    env = dict(os.environ, **environ)
    if hide_accelerator:
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
