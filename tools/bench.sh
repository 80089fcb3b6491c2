#!/usr/bin/env bash
# `make bench`: every job's benchmark, each ending with its JSON line (bench, throughput, unit, bound, ratio).
# Uses ../shared/media/videos/imageio-binaries/cockatoo.mp4 (720p H.264) when present, else a generated clip.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${BENCH_DIR:-.bench}
mkdir -p "$W"
CLIP=../shared/media/videos/imageio-binaries/cockatoo.mp4
if [ ! -f "$CLIP" ]; then
  echo "(../shared/media absent: benchmarking a generated 720p clip instead of cockatoo.mp4)"
  [ -f "$W/toy720/toy_0000.mp4" ] || abvid toy-corpus "$W/toy720" --videos 1 --seconds 14 --size 1280x720 --fps 20 --seed 1
  CLIP="$W/toy720/toy_0000.mp4"
fi
[ -d "$W/corpus" ] || abvid toy-corpus "$W/corpus" --videos 8 --seconds 8 --size 456x256 --seed 0
[ -f "$W/shards/stats.json" ] || abvid preprocess "$W/corpus" --out "$W/shards" --fps 4 --size 256 --clip-len 16 > /dev/null

{
  echo "== preprocess";  abvid bench preprocess "$CLIP" --fps 4 --size 256
  echo "== loader";      abvid bench loader "$W/shards" --workers "${WORKERS:-2}"
  echo "== train (DINO)";   abvid bench train --arch vit_tiny
  echo "== train (DINO, gamma 0.5)"; abvid bench train --arch vit_tiny --gamma 0.5
  echo "== train (SimCLR)"; abvid bench train --arch vit_tiny --objective simclr
  echo "== train (SimCLR, gamma 0.5)"; abvid bench train --arch vit_tiny --objective simclr --gamma 0.5
  echo "== preprocess (folder)"; abvid bench preprocess "$W/corpus" --workers "${WORKERS:-2}" --rounds 2
  echo "== embed";       abvid bench embed "$CLIP" --arch vit_tiny --copies 2 --batch-size 32
  echo "== embed (workers)"; abvid bench embed "$W/corpus" --arch vit_tiny --size 112 --batch-size 32 --workers "${WORKERS:-2}"
} 2>&1 | tee "$W/bench.log"
echo "JSON lines:"; grep '^{' "$W/bench.log"
