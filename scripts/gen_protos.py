"""Generate the Python protobuf and gRPC code for protos/ into the edgeft package.

    python scripts/gen_protos.py [--out DIR]

protos/edgeft/v1/edgeft.proto becomes edgeft/v1/edgeft_pb2.py, edgeft_pb2.pyi and edgeft_pb2_grpc.py.
The output is committed; tests/test_protos.py fails when it is stale. Needs grpcio-tools (the dev extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out: Path) -> list[Path]:
    """Run protoc on every .proto file under protos/; returns the generated files."""
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                        f"--grpc_python_out={out}", *sources])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    stems = [out / Path(source).with_suffix("") for source in sources]
    return [stem.with_name(stem.name + suffix) for stem in stems for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    sys.exit(main())
