"""Narrow compatibility patches that let megatron-core 0.16.1 run on the CPU accelerator.

Megatron assumes CUDA. We patch the *targets* of its CUDA-only call sites (not the call sites'
modules, and not with a TorchFunctionMode: that is thread-local and megatron runs engine work
in threads). Each patch is applied only when the accelerator is CPU and CUDA is absent, is
reversible (tests remove each one and check that its call site breaks), and says why it exists.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Patch:
    name: str
    why: str
    apply: Callable[[], Callable[[], None]]  # returns the function that reverts it


def _patch_attr(owner, attr: str, new) -> Callable[[], None]:
    old = getattr(owner, attr)
    setattr(owner, attr, new)
    return lambda: setattr(owner, attr, old)


def _current_device_is_cpu() -> Callable[[], None]:
    # ~40 megatron call sites allocate with device=torch.cuda.current_device() (rotary
    # embedding, TP mappings/layers/utils). On a CPU-only torch that call raises; "cpu" is the
    # device those tensors belong on.
    return _patch_attr(torch.cuda, "current_device", lambda: torch.device("cpu"))


def _synchronize_is_noop() -> Callable[[], None]:
    # dist_checkpointing's save (filesystem_async.preload_tensors) and the inference p2p
    # utils call torch.cuda.synchronize(); on CPU there is no stream to wait for.
    return _patch_attr(torch.cuda, "synchronize", lambda device=None: None)


def _tied_embedding_sync_on_cpu() -> Callable[[], None]:
    # LanguageModule.setup_embeddings_and_output_layer moves the tied output weight with
    # Tensor.cuda() before all-reducing it across the embedding group (PP>1, tied embeddings).
    # Make .cuda() the identity only for the duration of that method.
    from megatron.core.models.common.language_module import language_module as lm

    original = lm.LanguageModule.setup_embeddings_and_output_layer

    def setup_on_cpu(self, *args, **kwargs):
        saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = saved

    return _patch_attr(lm.LanguageModule, "setup_embeddings_and_output_layer", setup_on_cpu)


PATCHES: list[Patch] = [
    Patch("cuda-current-device", "device=torch.cuda.current_device() allocations", _current_device_is_cpu),
    Patch("cuda-synchronize", "torch.cuda.synchronize() in dist-checkpoint save", _synchronize_is_noop),
    Patch("tied-embedding-cuda", "Tensor.cuda() in tied-embedding setup for PP>1", _tied_embedding_sync_on_cpu),
]

_reverts: dict[str, Callable[[], None]] = {}


def apply_all() -> list[str]:
    """Apply every patch not yet applied; returns the names applied now."""
    applied = []
    for p in PATCHES:
        if p.name not in _reverts:
            _reverts[p.name] = p.apply()
            applied.append(p.name)
    return applied


def revert(name: str) -> None:
    _reverts.pop(name)()


@contextlib.contextmanager
def without(name: str):
    """Temporarily remove one patch (tests use this to show its call site needs it)."""
    revert(name)
    try:
        yield
    finally:
        _reverts[name] = next(p for p in PATCHES if p.name == name).apply()
