"""Regenerate the Python code that sits beside each .proto, or check that it is current.

python protos/generate.py          # rewrite *_pb2.py, *_pb2_grpc.py, *_pb2.pyi
python protos/generate.py --check  # exit 1 if the checked-in code differs from a fresh generation
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def _generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


def _generated(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.name.endswith(SUFFIXES)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        _generate(fresh)
        want, have = _generated(fresh), _generated(ROOT)
        stale = sorted(str(p) for p in want ^ have)
        stale += sorted(str(p) for p in want & have if not filecmp.cmp(fresh / p, ROOT / p, shallow=False))
        if check:
            if stale:
                print("generated code is stale; run `python protos/generate.py`:", *stale, sep="\n  ")
                return 1
            print(f"generated code is current ({len(want)} files)")
            return 0
        for p in have - want:
            (ROOT / p).unlink()
        for p in want:
            shutil.copyfile(fresh / p, ROOT / p)
        print(f"wrote {len(want)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
