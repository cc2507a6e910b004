"""Third-party warnings known to be harmless here, silenced at their source; any other warning still shows.

Entry points call ``quiet_third_party()`` first thing in ``main``: megatron-core and DeepSpeed are only
imported lazily after that, so these filters are in place before any of them is emitted.
"""
from __future__ import annotations

import logging
import warnings


def quiet_third_party() -> None:
    # megatron-core falls back to its torch implementations without Transformer Engine / Apex (CUDA-only fused
    # kernels); we build its local (torch) layer spec on purpose, and its optimizers are for training only.
    warnings.filterwarnings("ignore", r"(Transformer Engine and )?Apex (is|are) not installed", UserWarning,
                            r"megatron\.core\.")
    # megatron-core 0.16.1's own TransformerConfig default (cuda_graph_scope="full") trips its own deprecation;
    # we never capture CUDA graphs.
    warnings.filterwarnings("ignore", "full scope is deprecated", UserWarning,
                            r"megatron\.core\.transformer\.transformer_config")
    # megatron-core's dist_checkpointing loader calls torch.distributed.checkpoint APIs that torch 2.13 has
    # deprecated (still supported in the pinned torch); loading is correct and the calls are not ours.
    warnings.filterwarnings("ignore", "`load_state_dict` is deprecated", FutureWarning,
                            r"megatron\.core\.dist_checkpointing\.")
    warnings.filterwarnings("ignore", "Please use DTensor instead and we are deprecating ShardedTensor",
                            FutureWarning, r"torch\.distributed\.checkpoint\.")
    logging.getLogger("DeepSpeed").addFilter(_not_cpu_accelerator_notice)
    # megatron's FSDP (training only, imported transitively) announces its backend at INFO.
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)


def _not_cpu_accelerator_notice(record: logging.LogRecord) -> bool:
    # DeepSpeed announces it picked the CPU accelerator: expected on a CPU host (a GPU host picks CUDA silently).
    return not record.getMessage().startswith("Setting accelerator to CPU")
