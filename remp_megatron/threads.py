"""One thread per process runs torch's CPU kernels on several cores: the one that set up the rank.

torch parallelises CPU kernels with OpenMP (libgomp). libgomp gives every thread that runs a
parallel region a team of worker threads, kept for that thread's life, and lets idle workers spin
(ready within microseconds for the next region) only while the process has no more OpenMP
threads than CPUs; past that, every region wakes its workers through the kernel. One second team
crosses that line on a 2-core machine, and two came uninvited: gloo's thread copying
``all_gather_object``'s bytes while megatron loads a checkpoint, and a serving loop on another
thread than the one that loaded the model. Measured on this project's 2-vCPU VM, SmolLM2, 2
threads (docs/benchmarks.md): a [112, 576] add took 73 µs instead of 6; an fp32 decode step of
one sequence 63 ms instead of 44, of 32 sequences 136 instead of 106; a 112-token prefill 198 ms
instead of 143. So: the thread that sets up a rank keeps the configured count (OMP_NUM_THREADS,
``torch.set_num_threads``) and runs every step; any other thread runs kernels on one.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

_owner: Optional[int] = None


def own_kernel_threads() -> None:
    """Make the calling thread the process's one multi-threaded kernel thread; every thread that
    runs its first kernel after this call uses one core. Call before any process group exists.
    (torch settles a thread's count in its first parallel loop: a thread whose first kernel is an
    MKL or oneDNN call still gets OMP_NUM_THREADS's count and a team, freed when it ends. Keep
    such threads short-lived, as a switch's is.)"""
    global _owner
    torch.get_num_threads()  # settles this thread's count now (torch settles a thread's at its first use)
    # torch.set_num_threads sets its caller's count and the count threads settle on later: set the
    # latter from a thread that ends at once.
    default = threading.Thread(target=torch.set_num_threads, args=(1,), name="kernel-threads")
    default.start()
    default.join()
    _owner = threading.get_ident()


def check_kernel_thread() -> None:
    """Raise unless the caller is the thread ``own_kernel_threads`` chose (or none was chosen)."""
    if _owner is not None and threading.get_ident() != _owner:
        raise RuntimeError(f"model steps run on thread {threading.current_thread().name!r}; they must run on "
                           "the thread that initialised the rank (for remp_megatron.pipeline: the thread that "
                           "created it), the only one with several kernel threads (remp_megatron/threads.py)")
