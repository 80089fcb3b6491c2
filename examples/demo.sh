#!/usr/bin/env bash
# End-to-end demo on data it makes itself (a few minutes on 2 CPU cores):
#   toy corpus -> preprocess -> pretrain (AB and base method) -> embed -> probe
# and a table of probe scores: random init vs base method vs annotation bootstrapping.
#
#   bash examples/demo.sh [OUT_DIR]        (or: make demo)
#
# Settings can be overridden from the environment, e.g. STEPS=300 bash examples/demo.sh
set -euo pipefail
OUT=${1:-demo_out}
STEPS=${STEPS:-}            # empty: the config's own train.steps
VIDEOS=${VIDEOS:-48}
SEED=${SEED:-0}
CONFIG=${CONFIG:-examples/configs/tiny_cpu.yaml}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
mkdir -p "$OUT"
steps_set=(); [ -n "$STEPS" ] && steps_set=(--set "train.steps=$STEPS")

echo "== 1/5 toy corpus ($VIDEOS videos) -> $OUT/corpus"
abvid toy-corpus "$OUT/corpus" --videos "$VIDEOS" --seed "$SEED"

echo "== 2/5 preprocess -> $OUT/shards"
abvid preprocess "$OUT/corpus" --out "$OUT/shards" --annotations "$OUT/corpus/annotations.csv" \
    --fps 4 --size 64 --clip-len 8 --shard-clips 16

declare -A RUNS=(
  [random]="train.steps=0"
  [base]="objective.bootstrap=false"
  [ab]="objective.bootstrap=true"
)
for name in random base ab; do
  echo "== 3/5 pretrain [$name] -> $OUT/runs/$name"
  abvid pretrain "$CONFIG" --out "$OUT/runs/$name" --no-resume \
      --set "data.shards=$OUT/shards" "${steps_set[@]}" --set "${RUNS[$name]}"
done

for name in random base ab; do
  echo "== 4/5 embed [$name]"
  ckpt=$(ls -1 "$OUT/runs/$name"/checkpoints/*.pt | sort | tail -n 1)
  abvid embed --checkpoint "$ckpt" "$OUT/shards" --out "$OUT/emb/$name" --overwrite   # pretrain reran: fresh
done

echo "== 5/5 probe (labels from $OUT/corpus/annotations.csv; split by video)"
for name in random base ab; do
  abvid probe --embeddings "$OUT/emb/$name" --labels "$OUT/corpus/annotations.csv" --method linear knn \
      --out "$OUT/emb/$name/probe.json" > "$OUT/emb/$name/probe.txt"
done
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {n: {r["method"]: r for r in json.load(open(f"{out}/emb/{n}/probe.json"))["results"]}
        for n in ("random", "base", "ab")}
metric = rows["ab"]["linear"]["metric"]
print(f"\nprobe on held-out videos ({metric}; chance {rows['ab']['linear']['chance']:.3f})")
print(f"{'encoder':22} {'linear':>8} {'k-NN':>8}")
for n, title in [("random", "random init"), ("base", "base method (no AB)"), ("ab", "AB (bootstrapped)")]:
    print(f"{title:22} {rows[n]['linear']['score']:8.3f} {rows[n]['knn']['score']:8.3f}")
json.dump({n: {m: r["score"] for m, r in v.items()} for n, v in rows.items()}, open(f"{out}/demo_result.json", "w"))
PY
