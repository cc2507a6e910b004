"""CPU kernels this project compiles for the machine it runs on, on first use
(torch.utils.cpp_extension: gcc and Python's headers; about 40 s on 2 cores, once per machine,
kept under TORCH_EXTENSIONS_DIR; ``make`` builds them with the venv). Without a compiler, or with
REMP_CPU_KERNELS=0, callers fall back to plain torch ops.

- ``paged_decode`` (csrc/paged_decode.cpp): decode attention that reads K/V through the block
  table in place. The torch path gathers every sequence's blocks into a padded copy, then runs
  SDPA over it; at 32 SmolLM2 sequences the kernel takes an fp32 decode step from 107 to 93 ms
  and a bf16 one from 57-59 to 53-54 (scripts/profile_step.py; docs/benchmarks.md).
- ``rms_norm``, ``add_rms_norm``, ``silu_mul``, ``rope_qk`` (csrc/pointwise.cpp): a layer's small
  ops fused, one pass each instead of 3-6 torch ops (``fused.py`` chooses them or torch).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

log = logging.getLogger("remp.kernels")

ENABLE_ENV = "REMP_CPU_KERNELS"
_NAME = "remp_cpu_kernels"
_SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
_HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # -march=native: built where it runs
_STALE_LOCK_S = 600  # a build lock this old was left by a process killed mid-build


def _cpu_features() -> str:
    """What -march=native compiles for: a library built on one CPU may not run on another sharing
    the folder (AVX-512 code on a CPU without it: SIGILL)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build_dir() -> Path:
    """One folder per source, flags, CPU features, torch version and Python ABI: a built library there is current."""
    parts = [f.read_text() for f in _SOURCES + _HEADERS] + [*_CFLAGS, _cpu_features(), torch.__version__,
                                                             sys.implementation.cache_tag]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    path = Path(root) / f"{_NAME}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def kernels() -> Optional[ModuleType]:
    """The built module (its functions: csrc/bindings.cpp; arguments: their sources), or None
    where it cannot be had."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return None
    t0 = time.monotonic()
    try:
        build = _build_dir()
        library = build / f"{_NAME}.so"
        if library.exists():  # imported as it is: no build lock to wait on, no compiler run
            spec = importlib.util.spec_from_file_location(_NAME, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            from torch.utils.cpp_extension import load

            lock = build / "lock"  # ranks on one machine build once between them; the others wait on it
            if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
                log.warning("removing a stale build lock %s", lock)
                lock.unlink(missing_ok=True)
            log.info("compiling the CPU kernels into %s (once per machine, ~40 s)", build)
            module = load(_NAME, [str(f) for f in _SOURCES], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                          build_directory=str(build))
            log.info("CPU kernels built in %.1f s", time.monotonic() - t0)
    except Exception as e:  # no compiler, no headers, a full disk: the torch path still serves
        why = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        log.warning("CPU kernels unavailable, the torch ops run instead: %s: %s", type(e).__name__, why)
        return None
    return module


if __name__ == "__main__":  # `python -m remp_megatron.cpu_kernels`: build now (the Makefile does, once per venv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernels()
