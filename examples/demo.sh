#!/usr/bin/env bash
# End-to-end demo on data it makes itself (about 4 minutes on 2 CPU cores):
#   for each toy corpus (shapes, crowd): a pretraining corpus and a disjoint probe corpus -> preprocess
#   -> pretrain (random init, base method, AB) -> embed the probe videos -> probe, and a table.
# It is seed 0 of the ablation (examples/ablation.sh, `abvid ablate`), on three of its rows.
#
#   bash examples/demo.sh [OUT_DIR]        (or: make demo)
#
# Settings can be overridden from the environment, e.g. STEPS=100 VIDEOS=24 bash examples/demo.sh.
# Each run starts afresh (the corpora and shards are kept and reused).
set -euo pipefail
OUT=${1:-demo_out}
STEPS=${STEPS:-}            # empty: the config's own train.steps
SEED=${SEED:-0}
export VIDEOS=${VIDEOS:-48} CONFIG=${CONFIG:-examples/configs/tiny_cpu.yaml} JOBS=${JOBS:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
mkdir -p "$OUT"
steps_set=(); [ -n "$STEPS" ] && steps_set=(--set "train.steps=$STEPS")
rm -rf "$OUT/shapes/runs" "$OUT/crowd/runs"        # fresh runs; `abvid ablate` would reuse finished ones
CORPUS_SEED=$SEED SEEDS=$SEED ROWS="random base ab" bash examples/ablation.sh "$OUT" "${steps_set[@]}"

python - "$OUT" "$SEED" <<'PY'
import json, sys
from pathlib import Path
from abvid.train.ablation import WHICH, probe_file
out, seed = sys.argv[1], sys.argv[2]
result = {}
for kind in ("shapes", "crowd"):
    rows = {}
    for name in ("random", "base", "ab"):
        probe = json.loads(probe_file(Path(f"{out}/{kind}/runs/{name}/seed{seed}"), WHICH[0]).read_text())["results"]
        rows[name] = {r["method"]: r for r in probe}
    result[kind] = {n: {m: r["score"] for m, r in v.items()} for n, v in rows.items()}
    lin = rows["ab"]["linear"]
    print(f"\n{kind}: probe on held-out videos ({lin['metric']}; chance {lin['chance']:.3f}; {WHICH[0]} encoders)")
    print(f"{'encoder':22} {'linear':>8} {'k-NN':>8}")
    for n, title in [("random", "random init"), ("base", "base method (no AB)"), ("ab", "AB (bootstrapped)")]:
        print(f"{title:22} {rows[n]['linear']['score']:8.3f} {rows[n]['knn']['score']:8.3f}")
json.dump(result, open(f"{out}/demo_result.json", "w"), indent=2)
PY
