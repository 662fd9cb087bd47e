"""Python gRPC stubs for TorchServe, generated from the .proto files inside its own jar.

TorchServe ships no Python stubs; its frontend jar holds ``inference.proto`` (native API),
``open_inference_grpc.proto`` (Open Inference Protocol, package
``org.pytorch.serve.grpc.openinference``) and the ``google/rpc`` files they import.
"""

from __future__ import annotations

import importlib
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import ts

JAR = Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"
PROTOS = ("inference.proto", "open_inference_grpc.proto", "google/rpc/status.proto")


def generate_stubs(out: Path) -> dict[str, ModuleType]:
    """Generate into ``out`` and import: ``inference_pb2(_grpc)`` and
    ``open_inference_grpc_pb2(_grpc)``, by module name."""
    from grpc_tools import protoc

    with zipfile.ZipFile(JAR) as jar:
        for name in PROTOS:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(jar.read(name))
    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{out}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main([*args, *[str(out / name) for name in PROTOS]]) != 0:
        raise RuntimeError(f"protoc failed on the protos of {JAR}")
    sys.path.insert(0, str(out))
    names = ["inference_pb2", "inference_pb2_grpc", "open_inference_grpc_pb2"]
    return {
        name: importlib.import_module(name) for name in [*names, "open_inference_grpc_pb2_grpc"]
    }
