"""Runtime: device and backend choice, and process-group init under torchrun.

DeepSpeed's accelerator abstraction decides: ``cpu``/``gloo`` here, ``cuda``/``nccl`` on GPU
hosts. Control messages (step plans, pause/resume) always go over a separate gloo group so
they stay on the CPU whatever the data plane is.
"""
from __future__ import annotations

import datetime
import importlib
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import threads

log = logging.getLogger("remp.runtime")


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    control_group: dist.ProcessGroup

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"


def accelerator() -> tuple[str, str]:
    """(device type, communication backend) from DeepSpeed's accelerator."""
    # deepspeed.accelerator is cheap to import; deepspeed.init_distributed() is not (it
    # JIT-compiles a shm op on CPU), so we never call it.
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return acc.device_name(), acc.communication_backend_name()


# What a rank builds from: models, MoE layers, dist-checkpointing.
MEGATRON_MODULES = ("megatron.core.models.gpt.gpt_model", "megatron.core.transformer.moe.moe_layer",
                    "megatron.core.dist_checkpointing")


def _no_compile(model=None, **_):
    return model if model is not None else (lambda fn: fn)


def import_megatron() -> None:
    """Import megatron-core with ``torch.compile`` a no-op while its modules load.

    megatron decorates its fused kernels with ``torch.compile`` (``megatron.core.jit.jit_fuser``),
    which imports TorchInductor: ~1.5 of the ~3.7 s a rank spent importing torch and megatron
    (every rank of every world and server pays it). We never call those kernels (fusions are off in
    ``model.megatron_config``: the unfused paths are exact on every device), and megatron's
    ``jit_fuser`` stays the no-op for any of its modules imported later.
    """
    if "megatron.core" in sys.modules:
        return
    real, torch.compile = torch.compile, _no_compile
    try:
        for name in MEGATRON_MODULES:
            importlib.import_module(name)
    finally:
        torch.compile = real


def init_distributed(timeout_s: float = 300.0, rank: int | None = None, world: int | None = None,
                     init_method: str | None = None) -> Runtime:
    """Initialise torch.distributed from torchrun's environment (or a 1-rank world). ``rank``,
    ``world`` and ``init_method`` (a ``tcp://`` address) override it, for a process that starts
    its own world (``remp_megatron.pipeline``). The calling thread is the one to run the rank's steps
    (threads.py)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if init_method is None else rank
    import_megatron()
    threads.own_kernel_threads()  # before gloo's threads exist: they must not run kernels on several cores
    device_type, backend = accelerator()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_type)
    if device.type == "cpu":
        from . import cpu_compat

        cpu_compat.apply_all()
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if init_method is None and "MASTER_ADDR" not in os.environ:  # one process outside torchrun (tools, tests)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        store = _restart_store(timeout) if init_method is None else None
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout, init_method=init_method,
                                store=store)
    control = dist.new_group(backend="gloo", timeout=timeout)
    log.info("rank %d/%d device=%s backend=%s", rank, world, device, backend)
    return Runtime(rank, world, local_rank, device, backend, control)


def _restart_store(timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun with restarts: torchrun's store, with keys private to this attempt. A world
    torchrun re-formed after a rank died otherwise finds the dead world's gloo addresses under the
    same keys and fails to connect (pytorch/pytorch#167288)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"remp/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
