#!/usr/bin/env bash
# One lease on a GPU machine: the throughput benchmark (issue 11 (a)-(d)) and the lease-sized study.
#
#   bash bench/device/lease_run.sh [bench] [study]      # default: both; run from the repository root
#
# Needs .gpu_data/ (bench/device/pack_data.py) and bench/device/wheels/ (lightly, pip download --no-deps)
# carried beside the checkout; writes at most 8 files under $OUT (the device tool's limit): the benchmark
# JSON, the study's results.md / results.csv / curve, GPU utilisation sampled every 2 s, and one tar with
# the logs and the TensorBoard events of the study. A command may run 10 minutes: everything here stops
# at DEADLINE seconds (default 570) after the start; the study resumes where it stopped when run again
# (finished bundle runs are skipped), so a second `lease_run.sh study` finishes it.
set -u
START=$(date +%s)
DEADLINE=${DEADLINE:-570}
OUT=${OUT:-./lease_out}
mkdir -p "$OUT"
STEPS=${*:-bench study}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONWARNINGS=ignore
PY=${PYTHON:-python}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

if ls bench/device/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index bench/device/wheels/*.whl 2>&1 | tail -2
fi
$PY - <<'PY' || { echo "missing dependencies on this machine (see above)"; exit 2; }
import importlib, sys
missing = [m for m in ("torch", "monai", "ignite", "pydicom", "pandas", "filelock", "tqdm") if importlib.util.find_spec(m) is None]
print("torch", __import__("torch").__version__, "cuda", __import__("torch").cuda.is_available(), "missing:", missing)
sys.exit(1 if missing else 0)
PY
[ -f .gpu_data/ham10000/metadata.csv ] || { echo ".gpu_data/ham10000 not carried (bench/device/pack_data.py)"; exit 2; }

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2 > "$OUT/gpu_util.csv" 2>/dev/null &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT

case " $STEPS " in *" bench "*)
  t=$(( $(left) < 260 ? $(left) : 260 ))
  echo "[lease] benchmark, up to ${t}s"
  timeout "$t" $PY bench/bench_gpu_pretrain.py --data .gpu_data/ham10000 --seconds "${BENCH_SECONDS:-8}" \
    --json "$OUT/gpu_pretrain.json" 2>&1 | grep -v -i warn | tail -20
  cp "$OUT/gpu_pretrain.json" bench/results/ 2>/dev/null
esac

case " $STEPS " in *" study "*)
  t=$(( $(left) - 15 ))
  if [ "$t" -gt 30 ]; then
    echo "[lease] study, up to ${t}s ($(date +%T))"
    timeout "$t" $PY -m medssl_monai.cli study configs/experiments/ham10000_label_efficiency_lease.json \
      2>&1 | grep -v -i warn | tail -30
    echo "[lease] study stopped with ${PIPESTATUS[0]} at $(date +%T) ($(( $(date +%s) - START ))s since start)"
  fi
  RUN=runs/ham10000_label_efficiency_lease
  for f in results.md results.csv label_efficiency.png; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
  tar czf "$OUT/study_logs.tgz" --exclude='*.pt' --exclude='image_cache' --exclude='*.npy' \
    "$RUN/logs" "$RUN/configs" $(find "$RUN" -path '*tensorboard*' -type d 2>/dev/null) 2>/dev/null
esac
echo "[lease] done in $(( $(date +%s) - START ))s"
