"""Regenerate fedslim's protobuf code from fedslim/protos; `--check` fails if the checked-in code is stale.

    python scripts/generate_protos.py          # rewrite fedslim/protos/**/*_pb2.py(i)
    python scripts/generate_protos.py --check  # exit 1 if they differ from what protoc generates

Needs grpcio-tools (in the `test` extra), pinned so that the generated code
matches the protobuf runtime Flower uses.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent.parent / "fedslim" / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every .proto under PROTO_ROOT, writing *_pb2.py and *_pb2.pyi to out_dir."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    relative = [str(p.relative_to(PROTO_ROOT)) for p in protos]
    status = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", *relative])
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*_pb2.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = [
            p
            for p in generated
            if not (PROTO_ROOT / p).exists() or not filecmp.cmp(Path(tmp) / p, PROTO_ROOT / p, shallow=False)
        ]
        if args.check:
            if stale:
                print(f"stale generated code: {', '.join(map(str, stale))}; run python scripts/generate_protos.py")
                return 1
            print(f"generated protobuf code is up to date ({len(generated)} files)")
            return 0
        for path in stale:
            (PROTO_ROOT / path).parent.mkdir(parents=True, exist_ok=True)
            (PROTO_ROOT / path).write_bytes((Path(tmp) / path).read_bytes())
        print(f"wrote {len(stale)} of {len(generated)} generated files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
