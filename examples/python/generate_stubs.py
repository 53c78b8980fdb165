"""Generates the Python gRPC stubs for tokenbroker.v1 into ./generated.

Run once after installing requirements.txt (and again when the proto
changes): `python generate_stubs.py`. The output is not committed: it
must match the installed protobuf runtime, so it is generated with it.
"""

import os
import pathlib
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = "tokenbroker/v1/token_broker.proto"


def main() -> int:
    out = pathlib.Path(os.environ.get("TOKEN_BROKER_STUBS_DIR", HERE / "generated"))
    out.mkdir(parents=True, exist_ok=True)
    # The well-known types (duration, timestamp) ship inside grpc_tools.
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        ]
    )
    if status != 0:
        print(f"protoc failed with status {status}", file=sys.stderr)
        return 1
    print(f"stubs for {PROTO} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
