#!/usr/bin/env bash
# MONAI Label 0.8.5 in its own virtual environment, with what it needs to start on this project's stack.
#
#   scripts/monai_label_env.sh [VENV_DIR]        (default .monailabel-venv; `make monai-label-env`)
#
# Kept apart from the project venv: MONAI Label pins and imports things the project does not want. The
# three start-up problems seen with a real server (../shared/notes/monai_label.md, docs/pacs.md) are fixed
# here, never in our bundle:
#   1. torchvision 0.28 (pulled in by monailabel) fails on the CPU torch 2.13 ("operator torchvision::nms
#      does not exist") and monailabel/transform/post.py imports torchvision.utils: a stand-in torchvision
#      package provides make_grid/save_image (classification never calls them).
#   2. pydicom: the project needs pydicom >= 3; MONAI Label's pydicom-seg imports
#      pydicom._storage_sopclass_uids (gone in pydicom 3): a sitecustomize.py aliases it to pydicom.uid.
#   3. SAM2 is on by default in the monaibundle app (needs torchvision and downloads weights): start the
#      server with `--conf sam2 false`.
# `monailabel` is a shell script running the first `python` on PATH: use VENV_DIR/bin/monailabel with
# VENV_DIR/bin first on PATH. Re-running is cheap: a finished environment is recognised by its stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.monailabel-venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.stamp-monailabel-0.8.5"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  echo "$VENV: ready (delete $STAMP to rebuild)"
  exit 0
fi
export PIP_CONSTRAINT="$PWD/constraints.txt"   # torch stays the local CPU wheel
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==2.13.0" "monailabel==0.8.5"
# the project itself (its bundles' configs import medssl_monai), with its own pydicom >= 3
"$PY" -m pip install --quiet -e .
"$PY" -m pip install --quiet "pydicom>=3.0"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# 1. the stand-in torchvision
"$PY" -m pip uninstall --quiet -y torchvision || true
mkdir -p "$SITE/torchvision"
cat > "$SITE/torchvision/__init__.py" <<'PYEOF'
"""Stand-in torchvision for MONAI Label on a CPU torch the real torchvision wheel does not match.

MONAI Label imports torchvision.utils at start-up; classification inference never calls it.
"""
__version__ = "0.0.0+medssl-stand-in"
PYEOF
cat > "$SITE/torchvision/utils.py" <<'PYEOF'
"""make_grid/save_image exist so that `from torchvision.utils import ...` works; they are never called."""


def make_grid(*args, **kwargs):
    raise NotImplementedError("stand-in torchvision (scripts/monai_label_env.sh): make_grid is not available")


def save_image(*args, **kwargs):
    raise NotImplementedError("stand-in torchvision (scripts/monai_label_env.sh): save_image is not available")
PYEOF
# 2. pydicom 3 under pydicom-seg
cat > "$SITE/sitecustomize.py" <<'PYEOF'
"""pydicom-seg (imported by MONAI Label) needs pydicom._storage_sopclass_uids, which pydicom 3 folded into
pydicom.uid; alias it so both work (scripts/monai_label_env.sh)."""
import sys

try:
    import pydicom.uid as _uid

    sys.modules.setdefault("pydicom._storage_sopclass_uids", _uid)
except ImportError:  # pydicom not installed: nothing to alias
    pass
PYEOF
# smoke: the server's imports and our bundle's imports work in this environment
"$PY" -c "import monailabel, pydicom, pydicom_seg, medssl_monai.bundle; print('monailabel', monailabel.__version__, 'pydicom', pydicom.__version__)"
touch "$STAMP"
echo "$VENV: ready"
