"""Generate the Python gRPC stubs for server/proto (``make proto``; tests check they are current).

Stubs are committed so that a plain checkout imports; regenerating with the pinned
grpcio-tools gives identical files (``tests/test_server.py`` checks it).
"""
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).parent / "proto"
PROTO = "remp/v1/remp.proto"


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", PROTO]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO_ROOT / PROTO}")


def main() -> None:
    generate(PROTO_ROOT)
    print(f"generated stubs in {PROTO_ROOT / 'remp' / 'v1'}", file=sys.stderr)


def generated_now() -> dict[str, str]:
    """The stubs as protoc would write them today (for the freshness test)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return {p.name: p.read_text() for p in (Path(tmp) / "remp" / "v1").glob("*.py")}


if __name__ == "__main__":
    main()
