#!/usr/bin/env bash
# The peer's venv: kvpress (which pins transformers < 5.3) beside torch 2.13.0, the CPU build that
# kvbench's own venv uses, so the two runs differ in the cache code and not in the kernels.
#
#   bash bench/peer/make_venv.sh            # creates bench/.cache/peer-venv once (idempotent)
#   bench/.cache/peer-venv/bin/python bench/peer/kvpress_decode.py --help
#
# torch is pinned exactly and in the same pip command as kvpress: 2.13.0 is the CPU build on our
# machines (a range, or kvpress's own torch<3, would let pip pick a CUDA build). kvpress 0.5.5 is the
# newest on PyPI (2026-09); it needs torch>=2.3.1 and transformers>=4.56,<5.3.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PEER_VENV:-$HERE/../.cache/peer-venv}"
TORCH="torch==2.13.0"
KVPRESS="kvpress==0.5.5"
TRANSFORMERS="transformers<5.3"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH" "$KVPRESS" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
torch_v, kvpress_v = sys.argv[1].split("==")[1], sys.argv[2].split("==")[1]
ok = version("torch").split("+")[0] == torch_v and version("kvpress") == kvpress_v
ok = ok and tuple(int(x) for x in version("transformers").split(".")[:2]) < (5, 3)
import kvpress  # noqa: F401  (imports: the install is whole)
sys.exit(0 if ok else 1)
PY
  echo "peer venv ready: $VENV"
  exit 0
fi

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first (alone, so a resolver backtrack can never swap it), then everything in one command
# with torch pinned again
"$VENV/bin/python" -m pip install "$TORCH"
"$VENV/bin/python" -m pip install "$TORCH" "$KVPRESS" "$TRANSFORMERS"
"$VENV/bin/python" - <<'PY'
import torch, transformers, kvpress
from importlib.metadata import version
print(f"peer venv: torch {torch.__version__}, transformers {transformers.__version__}, kvpress {version('kvpress')}")
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"a CUDA torch was installed: {torch.__version__}"
PY
echo "peer venv ready: $VENV"
