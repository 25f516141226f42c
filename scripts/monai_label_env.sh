#!/usr/bin/env bash
# MONAI Label 0.8.5 in its own virtual environment, with what it needs to start on this project's stack.
#
#   scripts/monai_label_env.sh [VENV_DIR]        (default .monailabel-venv; `make monai-label-env`)
#
# Kept apart from the project venv: MONAI Label pins and imports things the project does not want. Its own
# start-up problems (../shared/notes/monai_label.md, docs/monai_label.md) are fixed here, never in our bundle:
#   1. torchvision 0.28 (pulled in by monailabel) fails on the CPU torch 2.13 ("operator torchvision::nms
#      does not exist") and monailabel/transform/post.py imports torchvision.utils: a stand-in torchvision
#      package provides make_grid/save_image (classification never calls them).
#   2. pydicom: the project needs pydicom >= 3; MONAI Label's pydicom-seg imports
#      pydicom._storage_sopclass_uids (gone in pydicom 3): a sitecustomize.py aliases it to pydicom.uid.
#   3. SAM2 is on by default in the monaibundle app (needs torchvision and downloads weights): start the
#      server with `--conf sam2 false`.
#   4. With a DICOMweb datastore (`--studies http://.../dicom-web`) the server downloads dcmqi from GitHub
#      at every start unless `itkimage2segimage` is on PATH (it converts segmentation labels to DICOM SEG;
#      a classifier never saves one); offline that download kills the start. A stand-in
#      VENV_DIR/bin/itkimage2segimage that fails with a clear message avoids it.
#   5. MONAI Label's DICOMweb datastore converts each series to NIfTI by default; a 2-D slice read from that
#      NIfTI is the DICOM image transposed, so the classifier would see another picture. With
#      MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false it hands over the DICOM series folder, which
#      medssl_monai's loader reads as the DICOM file itself.
#   6. `monailabel` is a shell script running the first `python` on PATH.
# VENV_DIR/bin/monailabel-medssl runs MONAI Label with 4-6 in place (this environment's bin first on PATH,
# MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false unless set) and umask 077 (its DICOM cache holds PHI):
# `monailabel-medssl start_server ...`.
# Re-running is cheap: the pip installs are skipped while the stamp holds the hash of what they installed
# (this script's package versions, pyproject.toml, constraints.txt); the fixes are re-applied every time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.monailabel-venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.stamp-monailabel-0.8.5"
PACKAGES=("torch==2.13.0" "monailabel==0.8.5" "pydicom>=3.0")
WANT="$(cat pyproject.toml constraints.txt <(printf '%s\n' "${PACKAGES[@]}") | sha256sum | cut -d' ' -f1)"
PY="$VENV/bin/python"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$PY" ]; then
  echo "$VENV: installed (delete $STAMP to reinstall)"
else
  export PIP_CONSTRAINT="$PWD/constraints.txt"   # torch stays the local CPU wheel
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  rm -f "$STAMP"
  "$PYTHON" -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet "${PACKAGES[0]}" "${PACKAGES[1]}"
  # the project itself (its bundles' configs import medssl_monai), with its own pydicom >= 3
  "$PY" -m pip install --quiet -e .
  "$PY" -m pip install --quiet "${PACKAGES[2]}"
  echo "$WANT" > "$STAMP"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# 1. the stand-in torchvision
if "$PY" -m pip show --quiet torchvision >/dev/null 2>&1; then  # the real wheel, from monailabel
  "$PY" -m pip uninstall --quiet -y torchvision
fi
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
# 4. no dcmqi download at start-up (DICOMweb datastore)
cat > "$VENV/bin/itkimage2segimage" <<'SHEOF'
#!/bin/sh
# Stand-in (scripts/monai_label_env.sh): MONAI Label downloads dcmqi at start-up when this is not on PATH.
echo "itkimage2segimage: dcmqi is not installed in this MONAI Label environment; it is needed only to save" \
  "segmentation labels as DICOM SEG (install dcmqi 1.2.4 and put its bin/ first on PATH)" >&2
exit 1
SHEOF
chmod +x "$VENV/bin/itkimage2segimage"
# 5./6. the start command
cat > "$VENV/bin/monailabel-medssl" <<'SHEOF'
#!/bin/sh
# MONAI Label 0.8.5 with medssl-monai's settings (scripts/monai_label_env.sh): this environment first on PATH
# (its python, the itkimage2segimage stand-in), DICOMweb series handed over as DICOM folders, not NIfTI.
VENV="$(cd "$(dirname "$0")/.." && pwd)"
umask 077  # MONAI Label's DICOM cache (PHI), labels and sessions: owner-only (0700/0600)
PATH="$VENV/bin:$PATH"
MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI="${MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI:-false}"
export PATH MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI
exec "$VENV/bin/python" -m monailabel.main "$@"
SHEOF
chmod +x "$VENV/bin/monailabel-medssl"
# smoke: the server's imports and our bundle's imports (this checkout's) work in this environment
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import monailabel, pydicom, pydicom_seg, medssl_monai.bundle; print('monailabel', monailabel.__version__, 'pydicom', pydicom.__version__)"
echo "$VENV: ready"
