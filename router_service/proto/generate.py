"""Regenerate the Python code for the gRPC API from ``moefleet/v1/fleet.proto``.

    python -m moefleet.router_service.proto.generate          # rewrite the checked-in files
    python -m moefleet.router_service.proto.generate --out D  # write them to D (the test compares)

grpc_tools names the generated module after the proto path (``moefleet.v1``),
which would collide with the ``moefleet`` package; the generated files live
flat in this folder, import each other relatively, and register their message
classes under their real module name (so messages pickle, as Ray Serve's gRPC
proxy needs).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "moefleet/v1/fleet.proto"
FILES = ("fleet_pb2.py", "fleet_pb2.pyi", "fleet_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            ["protoc", f"-I{HERE}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(HERE / PROTO)]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        written = []
        for name in FILES:
            src = Path(tmp) / "moefleet" / "v1" / name
            text = src.read_text().replace("from moefleet.v1 import fleet_pb2", "from . import fleet_pb2")
            # message classes take their __module__ from this string; make it the real module so they pickle
            text = text.replace("'moefleet.v1.fleet_pb2', _globals)", "__name__, _globals)")
            dst = out / name
            dst.write_text(text)
            written.append(dst)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
