"""megatron-core with its ``jit_fuser`` off, decided before megatron is imported.

``megatron.core.jit`` sets ``jit_fuser = torch.compile`` and ~15 megatron modules decorate
fusion kernels with it at import, which imports dynamo and inductor: ~1.5-2 s of every
process's start (each rank, each test world, each restart). We run none of those fusions
(``model.megatron_config`` turns them off: the unfused paths are exact on every device), and
one reached anyway runs eagerly instead of being compiled on its first call. Megatron has this
mode (``disable_jit_fuser``) but it acts after import, when every kernel is decorated already;
so this module stands in for ``megatron.core.jit`` when the package is imported first.
"""
from __future__ import annotations

import sys
import types


def noop_decorator(func):
    return func


def install() -> None:
    """Provide ``megatron.core.jit`` with the fuser off, unless megatron is imported already."""
    if "megatron.core" in sys.modules:
        return
    jit = types.ModuleType("megatron.core.jit", __doc__)
    jit.jit_fuser = jit.noop_decorator = noop_decorator
    jit.enable_jit_fuser = jit.disable_jit_fuser = lambda: None
    sys.modules["megatron.core.jit"] = jit
