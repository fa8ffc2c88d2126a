"""Generated protobuf and gRPC code for the edgeft.v1 wire contract (protos/edgeft/v1/edgeft.proto).

Do not edit: run ``python scripts/gen_protos.py``. Only ``edgeft.wire`` converts these messages.
"""
