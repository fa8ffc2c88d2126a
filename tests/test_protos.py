"""The generated protobuf code is what scripts/gen_protos.py makes from protos/ today."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_not_stale(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    assert fresh, "no .proto file found under protos/"
    for path in fresh:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed.relative_to(ROOT)} is missing: run python scripts/gen_protos.py"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.relative_to(ROOT)} is stale: run python scripts/gen_protos.py and commit the result")


def test_generated_code_imports():
    from edgeft.v1 import edgeft_pb2, edgeft_pb2_grpc

    assert edgeft_pb2.DESCRIPTOR.package == "edgeft.v1"
    assert hasattr(edgeft_pb2_grpc, "CoordinatorServicer") and "edgeft_pb2" in sys.modules["edgeft.v1.edgeft_pb2"].__name__
