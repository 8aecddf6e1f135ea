"""Regenerate `gen/` from `protos/arf/cloud/v1/training.proto` with grpcio-tools.

    .venv/bin/python -m arf_training.grpc_service.codegen      (or `make protos`)

The generated `training_pb2_grpc.py` imports its messages as `arf.cloud.v1.training_pb2`
(the proto's path); we rewrite that to a relative import so that `gen/` is a plain subpackage
and no top-level `arf` package is needed. The descriptor keeps the proto's full path
(`arf/cloud/v1/training.proto`), which is what server reflection shows.
"""

from __future__ import annotations

import sys
from pathlib import Path

from arf_training.settings import REPO_ROOT

PROTO_ROOT = REPO_ROOT / "protos"
PROTO = "arf/cloud/v1/training.proto"
GEN = Path(__file__).resolve().parent / "gen"


def regenerate(out: Path = GEN) -> list[Path]:
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise SystemExit("regenerating needs grpcio-tools: pip install -e '.[grpc]'") from exc
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
                            f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                            str(PROTO_ROOT / PROTO)])
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / Path(PROTO).parent).iterdir()):
            text = src.read_text().replace("from arf.cloud.v1 import training_pb2",
                                           "from . import training_pb2")
            target = out / src.name
            target.write_text(text)
            written.append(target)
    (out / "__init__.py").write_text(f'"""Generated from protos/{PROTO} by codegen.py; do not '
                                     'edit."""\n')
    return written


if __name__ == "__main__":
    for path in regenerate():
        print(f"wrote {path}")
    sys.exit(0)
