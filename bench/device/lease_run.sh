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
#
# Every fine-tuned model also predicts the blind test set (.gpu_data/blind/ham10000_test, packed by
# pack_data.py: predicted only, never trained or chosen on); the CSVs come back as one blind_csvs.tgz.
#
# SMOKE=1 shrinks everything (benchmark --smoke; the study on HAM10000's `mini` subset, 1 epoch a phase,
# small batches, 12 blind images) so that a CPU dry run checks the whole script before a GPU minute is spent.
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
[ -f .gpu_data/blind/ham10000_test/images.csv ] || { echo ".gpu_data/blind not carried (bench/device/pack_data.py)"; exit 2; }
SMOKE=${SMOKE:-0}
CONFIG=configs/experiments/ham10000_label_efficiency_lease.json
RUN=runs/ham10000_label_efficiency_lease
BENCH_ARGS=()
if [ "$SMOKE" = 1 ]; then
  BENCH_ARGS=(--smoke)
  RUN=runs/lease_smoke
  CONFIG=runs/lease_smoke.json
  mkdir -p runs
  head -13 .gpu_data/blind/ham10000_test/images.csv > runs/lease_smoke_blind.csv
  $PY - "$CONFIG" <<'PY'
import json, os, sys
from pathlib import Path
lease = json.loads(Path("configs/experiments/ham10000_label_efficiency_lease.json").read_text())
def small(section):  # one epoch, batch 16, no bf16 / channels-last (CPU) where the lease section sets them
    cpu = {k: v for k, v in {"amp": None, "channels_last": False}.items() if k in lease[section]}
    return {"max_epochs": 1, "batch_size": 16, **cpu}
cfg = {"extends": os.path.abspath("configs/experiments/ham10000_label_efficiency_lease.json"),
       "run_dir": os.path.abspath("runs/lease_smoke"),
       "table": {**lease["table"], "path": os.path.abspath(".gpu_data/ham10000/metadata.csv"), "subset": "mini"},
       "natural_dir": os.path.abspath(".gpu_data/imagenette"),
       "common": {**lease["common"], "image_size": 32, "num_workers": 0},
       "phase1": {**lease["phase1"], **small("phase1"), "knn_interval": 0},
       "medical": {**lease["medical"], **small("medical"), "knn_interval": 0},
       "medical_per_arm": {"phase1_micle": {"max_epochs": 1}},
       "supervised": {**lease["supervised"], **small("supervised"), "val_interval": 1},
       "finetune": {**lease["finetune"], **small("finetune"), "num_workers": 0, "val_interval": 1},
       "seeds": {k: v[:1] for k, v in lease["seeds"].items()}, "min_seeds": 1, "parallel_finetunes": 2,
       "predict_sets": {"blind": os.path.abspath("runs/lease_smoke_blind.csv")}}
for section in ("phase1", "medical", "supervised", "finetune"):
    cfg[section] = {k: v for k, v in cfg[section].items() if v is not None}
Path(sys.argv[1]).write_text(json.dumps(cfg, indent=1))
PY
  sed -i "s#^images/#$PWD/.gpu_data/blind/ham10000_test/images/#; s#,images/#,$PWD/.gpu_data/blind/ham10000_test/images/#" runs/lease_smoke_blind.csv
fi

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2 > "$OUT/gpu_util.csv" 2>/dev/null &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT

case " $STEPS " in *" bench "*)
  t=$(( $(left) < 260 ? $(left) : 260 ))
  echo "[lease] benchmark, up to ${t}s"
  timeout "$t" $PY bench/bench_gpu_pretrain.py --data .gpu_data/ham10000 --seconds "${BENCH_SECONDS:-8}" \
    "${BENCH_ARGS[@]}" --json "$OUT/gpu_pretrain.json" 2>&1 | grep -v -i warn | tail -20
  [ "$SMOKE" = 1 ] || cp "$OUT/gpu_pretrain.json" bench/results/ 2>/dev/null
esac

case " $STEPS " in *" study "*)
  t=$(( $(left) - 15 ))
  if [ "$t" -gt 30 ]; then
    echo "[lease] study, up to ${t}s ($(date +%T))"
    timeout "$t" $PY -m medssl_monai.cli study "$CONFIG" \
      2>&1 | grep -v -i warn | tail -30
    echo "[lease] study stopped with ${PIPESTATUS[0]} at $(date +%T) ($(( $(date +%s) - START ))s since start)"
  fi
  for f in results.md results.csv label_efficiency.png; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
  tar czf "$OUT/study_logs.tgz" --exclude='*.pt' --exclude='image_cache' --exclude='*.npy' \
    "$RUN/logs" "$RUN/configs" $(find "$RUN" -path '*tensorboard*' -type d 2>/dev/null) 2>/dev/null
  # the blind test set's predictions, one CSV per fine-tuned model (docs/results/blind/lease/)
  [ -d "$RUN/predict_sets/blind" ] && tar czf "$OUT/blind_csvs.tgz" -C "$RUN/predict_sets" --exclude='manifest*' blind
  ls -la "$OUT"
esac
case " $STEPS " in *" selection "*)  # after the study: its MICLe backbone picks the lesions to label
  t=$(( $(left) - 15 ))
  if [ "$t" -gt 30 ] && [ "$SMOKE" != 1 ]; then
    timeout "$t" $PY -m medssl_monai.cli study configs/experiments/ham10000_selection_lease.json 2>&1 | grep -v -i warn | tail -20
    SEL=runs/ham10000_selection_lease
    [ -f "$SEL/results.csv" ] && cp "$SEL/results.csv" "$OUT/selection_results.csv"
    [ -d "$SEL/predict_sets/blind" ] && tar czf "$OUT/selection_blind_csvs.tgz" -C "$SEL/predict_sets" --exclude='manifest*' blind
  fi
esac
echo "[lease] done in $(( $(date +%s) - START ))s"
