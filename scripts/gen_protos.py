#!/usr/bin/env python3
"""Regenerate the Python code of every protos/swarm/proto/v1/*.proto into swarm/proto/v1/.

    python scripts/gen_protos.py           # regenerate (commit the result)
    python scripts/gen_protos.py --check   # exit 1 when the committed code differs

The generated code is committed so that installing swarm needs no protoc. The check ignores
the lines that only stamp the generator's version (so a newer grpcio-tools on a fresh machine
does not fail CI when the code itself is unchanged).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PROTO_DIR = PROTO_ROOT / "swarm" / "proto" / "v1"
OUT_DIR = REPO / "swarm" / "proto" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
INIT_TEXT = '"""Generated protobuf and gRPC code (scripts/gen_protos.py). Never edit by hand."""\n'
# Lines that depend only on the generator's version, not on the .proto sources.
_VERSION_LINE = re.compile(
    r"(Protobuf Python Version|GRPC_GENERATED_VERSION|_runtime_version\.ValidateProtobufRuntimeVersion"
    r"|^\s*\d+,\s*$|^\s*'',\s*$|^\s*\d+,\s*\d+,\s*\d+,\s*$)"
)


def generate(out_root: Path) -> list[Path]:
    """Run protoc over all sources; returns the generated files (under out_root/swarm/proto/v1)."""
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    gen_dir = out_root / "swarm" / "proto" / "v1"
    return sorted(p for p in gen_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def _normalized(text: str) -> list[str]:
    return [line for line in text.splitlines() if not _VERSION_LINE.search(line)]


def committed_files() -> list[Path]:
    if not OUT_DIR.exists():
        return []
    return sorted(p for p in OUT_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp))}
    old = {p.name: p.read_text() for p in committed_files()}
    problems = []
    for name in sorted(set(fresh) | set(old)):
        if name not in old:
            problems.append(f"missing {OUT_DIR / name}")
        elif name not in fresh:
            problems.append(f"stale {OUT_DIR / name} (its .proto is gone)")
        elif _normalized(fresh[name]) != _normalized(old[name]):
            problems.append(f"out of date {OUT_DIR / name}")
    if problems:
        print("generated protobuf code differs from protos/:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        print("run `python scripts/gen_protos.py` and commit the result", file=sys.stderr)
        return 1
    print(f"protos OK ({len(fresh)} generated files up to date)")
    return 0


def regenerate() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for old in committed_files():
            old.unlink()
        for f in files:
            shutil.copyfile(f, OUT_DIR / f.name)
    for init in (OUT_DIR.parent / "__init__.py", OUT_DIR / "__init__.py"):
        if not init.exists():
            init.write_text(INIT_TEXT)
    print(f"wrote {len(files)} files to {OUT_DIR.relative_to(REPO)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is out of date")
    args = parser.parse_args(argv)
    return check() if args.check else regenerate()


if __name__ == "__main__":
    sys.exit(main())
