"""Regenerate the gRPC Python modules from the .proto files beside this file.

    python -m kiln.proto.generate            # write them here
    python -m kiln.proto.generate --check    # exit 1 if the committed ones are stale

protoc runs against a temporary tree `kiln/proto/*.proto`, so the generated modules import each
other as `kiln.proto.…` and work from the installed package. The KServe module then registers its
messages in a descriptor pool of its own instead of the process-wide one: its package is
`inference`, as Triton's is (the wire contract needs the name), and tritonclient's generated code
registers the same symbols in the default pool, so an application could not import both.
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
PRIVATE_POOL = {"grpc_service_pb2.py"}
DEFAULT_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL_LINES = "_POOL = _descriptor_pool.DescriptorPool()  # kiln: not the default pool (see generate.py)\n"


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
            text = path.read_text()
            if path.name in PRIVATE_POOL:
                if DEFAULT_POOL_LINE not in text:
                    raise SystemExit(f"{path.name}: protoc's output changed; update generate.py")
                text = text.replace(DEFAULT_POOL_LINE, PRIVATE_POOL_LINES + "DESCRIPTOR = _POOL.AddSerializedFile(")
            (out_dir / path.name).write_text(text)
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
