"""Regenerate the gRPC Python modules from the .proto files beside this file.

    python -m kiln.proto.generate            # write them here
    python -m kiln.proto.generate --check    # exit 1 if the committed ones are stale

protoc runs against a temporary tree `kiln/proto/*.proto`, so the generated modules import each
other as `kiln.proto.…` and work from the installed package.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("grpc_service.proto", "kiln.proto")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "kiln" / "proto"
        tree.mkdir(parents=True)
        for name in PROTOS:
            shutil.copyfile(HERE / name, tree / name)
        args = ["protoc", f"-I{tmp}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        if protoc.main(args + [f"kiln/proto/{name}" for name in PROTOS]) != 0:
            raise SystemExit("protoc failed")
        written = []
        for path in sorted(tree.glob("*_pb2*")):
            shutil.copyfile(path, out_dir / path.name)
            written.append(out_dir / path.name)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed modules instead")
    if not parser.parse_args().check:
        for path in generate(HERE):
            print(f"wrote {path}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [p.name for p in generate(Path(tmp)) if not filecmp.cmp(p, HERE / p.name, shallow=False)]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run python -m kiln.proto.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
