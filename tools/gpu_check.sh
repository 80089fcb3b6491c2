#!/usr/bin/env bash
# GPU check: one run on a GPU host measures training speed (one table) and runs the GPU tests.
#
#   bash tools/gpu_check.sh [RESULTS_FILE]       (default gpu_check_results.md; or: make gpu-check)
#   WHEELS=/path/to/wheels bash tools/gpu_check.sh     # a host without this project's dependencies
#
# 1. Dependencies: the project is imported from this checkout through a symlinked `abvid` package (no
#    install). What is missing is installed from $WHEELS (pip --no-index --find-links); torch must be there.
# 2. python -m abvid.tools.gpu_check (tools/gpu_check.py): ViT-S/16 and ViT-B/16 AB_DINO with compile off
#    and on (views/s, s/step, TFLOP/s, MFU, peak memory), then ViT-S/16 fed from real shards made here
#    (abvid toy-corpus + abvid preprocess) with CPU and with GPU decoding (data-wait), then one
#    `abvid bench embed` line (ViT-S/16, one decoder process per spare core). Each row runs under
#    TIME_LIMIT seconds; a row that runs out says so.
# 3. pytest -m gpu (under TEST_LIMIT seconds), its summary line appended to the results.
# The results file: one line naming card, host, torch and commit, then a markdown table the README takes
# as it is, then the pytest line. Expected ~4-5 min on an H100-class host (compiling dominates; the rows'
# limits bound it); not yet measured there.
# Env: PYTHON (default .venv/bin/python if present, else python3), TIME_LIMIT (120), TEST_LIMIT (150),
#      STEPS (40), BATCH (64), PEAK_TFLOPS (card peak for MFU if the table lacks it), SHARDS (existing shards),
#      ARCHS (vit_small,vit_base),
#      SKIP_TESTS=1, DRY_RUN=1 (CPU, tiny model: checks the script without a GPU).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
OUT=${1:-gpu_check_results.md}
case "$OUT" in /*) ;; *) OUT="$here/$OUT" ;; esac
PY=${PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# `abvid.*` importable from this checkout without installing (mirrors pyproject's package-dir).
mkdir -p "$TMP/pkg/abvid"
: > "$TMP/pkg/abvid/__init__.py"
for d in pipeline model train tools; do ln -s "$here/$d" "$TMP/pkg/abvid/$d"; done
export PYTHONPATH="$TMP/pkg${PYTHONPATH:+:$PYTHONPATH}"

check_missing() {
  "$PY" - <<'PY'
import importlib
mods = ["numpy", "yaml", "tqdm", "pytest", "torchdata", "webdataset", "PIL", "av", "safetensors", "cv2", "torchvision"]
def missing(m):
    try:
        importlib.import_module(m)
        return False
    except Exception:  # absent, or present but broken: either way unusable here
        return True
print(" ".join(m for m in mods if missing(m)))
PY
}
missing=$(check_missing)
if [ -n "$missing" ] && [ -n "${WHEELS:-}" ]; then
  echo "installing from $WHEELS: $missing"
  pip_names=$(echo "$missing" | sed 's/\byaml\b/pyyaml/; s/\bPIL\b/pillow/; s/\bcv2\b/opencv-python-headless/')
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" $pip_names 2>&1 | tail -n 3
  missing=$(check_missing)
fi
echo "python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())')"
if [ -n "$missing" ]; then
  echo "cannot measure: missing python modules: $missing (set WHEELS=/dir/with/wheels to install them)" | tee "$OUT"
  exit 3
fi

args=(--out "$OUT" --time-limit "${TIME_LIMIT:-120}")
[ -n "${STEPS:-}" ] && args+=(--steps "$STEPS")
[ -n "${BATCH:-}" ] && args+=(--batch "$BATCH")
[ -n "${SHARDS:-}" ] && args+=(--shards "$SHARDS")
[ -n "${ARCHS:-}" ] && args+=(--archs "$ARCHS")
[ "${DRY_RUN:-0}" = 1 ] && args+=(--dry-run)
"$PY" -m abvid.tools.gpu_check "${args[@]}"
rc=$?

if [ "${SKIP_TESTS:-0}" = 1 ]; then
  echo "pytest -m gpu: skipped (SKIP_TESTS=1)" | tee -a "$OUT"
else
  summary=$(timeout "${TEST_LIMIT:-150}" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ -o addopts="" 2>&1 | tail -n 1)
  trc=${PIPESTATUS[0]}
  [ "$trc" = 124 ] && summary="did not finish within ${TEST_LIMIT:-150} s"
  printf '\n`pytest -m gpu`: %s (exit %s)\n' "$summary" "$trc" | tee -a "$OUT"
fi
echo "results in $OUT"
exit $rc
