#!/usr/bin/env bash
# The seeded ablation of annotation bootstrapping on both toy corpora, from nothing to the tables:
#   for each corpus kind (shapes, crowd): a pretraining corpus and a disjoint probe corpus,
#   preprocessed alike, then `abvid ablate` (every row x every seed; resumable: rerun to continue).
#
#   bash examples/ablation.sh OUT                       # SimCLR on the first table's corpora: corpus seed 0, seeds 0 1 2
#   CORPUS_SEED=900 SEEDS="900 901 902" PROBE_VIDEOS=192 bash examples/ablation.sh OUT   # the README's 3-seed table
#   CORPUS_SEED=2000 SEEDS=2000 KINDS=crowd ROWS="base ab" bash examples/ablation.sh OUT/c2000   # one of 40 corpora
#       (the README's 40-corpus tables: one folder per corpus, pooled by examples/pool_tables.py)
#   bash examples/ablation.sh OUT/dino --set objective.name=dino          # the DINO family (extra args go to abvid ablate)
#   bash examples/ablation.sh OUT/clip --set objective.name=clip          # CLIP, the corpus' labels as captions
#   CORPUS_SEED=100 SEEDS="100 101" bash examples/ablation.sh OUT/val     # the validation runs
#   VIDEOS=192 PROBE_VIDEOS=48 bash examples/ablation.sh OUT/big          # 4x the pretraining videos, same probe
#
# The protocol is fixed here, before results: VIDEOS=48 pretraining videos (toy-corpus seed CORPUS_SEED)
# and PROBE_VIDEOS=VIDEOS probe videos (seed CORPUS_SEED + 1) per kind, 6 s at 12 fps; preprocess at 4 fps, 64 px,
# clips of 8 frames; the probe embeds the probe corpus only (pretraining never sees it) and splits
# it by video (30% test, split seed 0); linear and k-NN probes, mAP over the frame's labels; every
# run is probed through its student (online) encoder (`--which ema` after the other args: the AB runs'
# EMA encoders, the protocol before the fourth experiment in docs/EXPERIMENTS.md).
# Settings chosen by trying were chosen on CORPUS_SEED=100 with SEEDS="100 101" (docs/EXPERIMENTS.md); the
# first tables use CORPUS_SEED=0 with SEEDS="0 1 2", run once after the choices were frozen; every later
# experiment runs once on fresh ones (docs/EXPERIMENTS.md: CORPUS_SEED 200 to 3078).
set -euo pipefail
OUT=${1:?usage: bash examples/ablation.sh OUT [--set KEY=VALUE ...]}
shift                                   # the rest goes to abvid ablate (e.g. --set objective.name=dino)
CONFIG=${CONFIG:-examples/configs/tiny_cpu.yaml}
CORPUS_SEED=${CORPUS_SEED:-0}
SEEDS=${SEEDS:-0 1 2}
KINDS=${KINDS:-shapes crowd}
ROWS=${ROWS:-random base ab ab_gamma ab_no_time ab_no_actions ab_no_target}
JOBS=${JOBS:-1}
VIDEOS=${VIDEOS:-48}
PROBE_VIDEOS=${PROBE_VIDEOS:-$VIDEOS}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
mkdir -p "$OUT"
data=${DATA:-$OUT/data}
for kind in $KINDS; do
  for part in pretrain probe; do
    seed=$CORPUS_SEED; videos=$VIDEOS
    [ "$part" = probe ] && seed=$((CORPUS_SEED + 1)) && videos=$PROBE_VIDEOS
    dir="$data/$kind-$seed"
    if [ ! -f "$dir/corpus/annotations.csv" ]; then
      abvid toy-corpus "$dir/corpus" --kind "$kind" --videos "$videos" --seed "$seed"
    fi
    have=$(find "$dir/corpus" -maxdepth 1 -name 'toy_*.mp4' | wc -l)
    if [ "$have" -ne "$videos" ]; then    # a corpus made with another count: its shards would be silently reused
      echo "error: $dir/corpus holds $have videos, not the $videos asked for; use another DATA (or OUT), or delete $dir" >&2
      exit 2
    fi
    abvid preprocess "$dir/corpus" --out "$dir/shards" --annotations "$dir/corpus/annotations.csv" \
        --fps 4 --size 64 --clip-len 8 --shard-clips 16 --no-progress > "$dir/preprocess.log"
  done
  pre="$data/$kind-$CORPUS_SEED"; probe="$data/$kind-$((CORPUS_SEED + 1))"
  echo "== $kind: $CONFIG, seeds $SEEDS -> $OUT/$kind"
  # shellcheck disable=SC2086  # SEEDS and ROWS are word lists
  abvid ablate "$CONFIG" --shards "$pre/shards" --probe "$probe/shards" --labels "$probe/corpus/annotations.csv" \
      --out "$OUT/$kind" --seeds $SEEDS --rows $ROWS --jobs "$JOBS" "$@"
done
