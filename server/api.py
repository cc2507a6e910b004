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

__all__ = ["pb", "pb_grpc", "TOKEN_ENV"]
