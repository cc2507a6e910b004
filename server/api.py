"""The generated gRPC stubs (package remp.v1), importable as ``server.api.pb`` / ``pb_grpc``."""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).parent / "proto")
if _ROOT not in sys.path:  # protoc's stubs import each other as ``remp.v1.*``
    sys.path.insert(0, _ROOT)

from remp.v1 import remp_pb2 as pb  # noqa: E402
from remp.v1 import remp_pb2_grpc as pb_grpc  # noqa: E402

# Where servers and clients read the admin token when no file/flag gives one.
TOKEN_ENV = "REMP_ADMIN_TOKEN"


def describe_switch(r: pb.SwitchRecord) -> str:
    """The user-felt numbers of a switch (record or COMMITTED/ROLLED_BACK event), one line."""
    drain = f"drain {r.drain_s * 1e3:.0f} ms, " if r.drain_s else ""
    staged = f"staged {r.staging_s * 1e3:.0f} ms while serving, " if r.prestaged else "not pre-staged, "
    kv = f" ({r.kv_blocks - r.kv_blocks_staged} of {r.kv_blocks} KV blocks)" if r.kv_blocks else ""
    return (f"{staged}{drain}pause {r.pause_s * 1e3:.0f} ms, stall {r.stall_s * 1e3:.0f} ms, "
            f"{r.bytes_in_pause / 2**20:.1f} MiB sent in the pause{kv}")


__all__ = ["pb", "pb_grpc", "TOKEN_ENV", "describe_switch"]
