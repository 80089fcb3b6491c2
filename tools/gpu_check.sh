#!/usr/bin/env bash
# GPU check: the gpu-marked tests, then a short ViT-S/16 training benchmark; results in one file.
#
#   bash tools/gpu_check.sh [RESULTS_FILE]          (default gpu_check_results.txt; or: make gpu-check)
#
# Works on a bare GPU host whose python3 has torch (and numpy) but not this project's other
# dependencies: the project is imported from this checkout through a symlinked `abvid` package, so no
# install is needed. Optional: WHEELS=/path/to/wheels installs missing ones from there
# (pip --no-index); without torchdata/webdataset/opencv the benchmark uses synthetic in-memory batches
# (the model-only bound) and the loader benchmark is skipped with the reason.
#
# Benchmark: the real training loop (train/loop.py: bf16 autocast, fused AdamW, EMA, metrics) on
# ViT-S/16 AB_DINO with examples/configs/vit_s16_1gpu.yaml (its defaults without PyYAML), reporting
# views/s, step time, data-wait fraction, peak memory and MFU = counted FLOPs per step / step time /
# the card's peak dense bf16 FLOP/s (PEAK_TFLOPS overrides the built-in table).
# Env: PYTHON (default .venv/bin/python if present, else python3), BENCH_STEPS (60), BENCH_BATCH (64),
#      BENCH_COMPILE (0), SHARDS (real shards for the loader run; default: synthetic shards written here),
#      SKIP_TESTS=1, TIME_LIMIT (seconds per part, 480). Dry run without a GPU (checks the script only):
#      SKIP_TESTS=1 BENCH_DEVICE=cpu BENCH_STEPS=12 BENCH_BATCH=4 BENCH_OVERRIDES='{"model": {...}}' bash ...
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
OUT=${1:-gpu_check_results.txt}
case "$OUT" in /*) ;; *) OUT="$here/$OUT" ;; esac
PY=${PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
LIMIT=${TIME_LIMIT:-480}

# `abvid.*` importable from this checkout without installing (mirrors pyproject's package-dir).
mkdir -p "$TMP/pkg/abvid"
: > "$TMP/pkg/abvid/__init__.py"
for d in pipeline model train tools; do ln -s "$here/$d" "$TMP/pkg/abvid/$d"; done
export PYTHONPATH="$TMP/pkg${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "# abvid gpu_check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  host $(hostname)"
  echo "# git $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/# gpu: /'
} > "$OUT"

missing=$("$PY" - <<'PY'
import importlib
mods = ["numpy", "yaml", "tqdm", "pytest", "torchdata", "webdataset", "PIL", "av", "safetensors", "cv2"]
def missing(m):
    try:
        importlib.import_module(m)
        return False
    except Exception:  # absent, or present but broken: either way unusable here
        return True
print(" ".join(m for m in mods if missing(m)))
PY
)
if [ -n "$missing" ] && [ -n "${WHEELS:-}" ]; then
  echo "installing from $WHEELS: $missing" | tee -a "$OUT"
  pip_names=$(echo "$missing" | sed 's/\byaml\b/pyyaml/; s/\bPIL\b/pillow/; s/\bcv2\b/opencv-python-headless/')
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" $pip_names >> "$OUT" 2>&1 || true
  missing=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in '$missing'.split() if u.find_spec(m) is None))" 2>/dev/null || echo "$missing")
fi
echo "python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())')" | tee -a "$OUT"
echo "missing modules: ${missing:-none}" | tee -a "$OUT"

echo "== pytest -m gpu" | tee -a "$OUT"
if [ "${SKIP_TESTS:-0}" = 1 ]; then
  echo "skipped (SKIP_TESTS=1)" | tee -a "$OUT"
elif [[ " $missing " == *" pytest "* ]]; then
  echo "skipped: pytest is not installed (set WHEELS=... to install it)" | tee -a "$OUT"
else
  timeout "$LIMIT" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ -o addopts="" 2>&1 | tail -n 25 | tee -a "$OUT"
  echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT"
fi

run_bench() {  # $1 = synthetic | shards
  echo "== benchmark ($1)" | tee -a "$OUT"
  BENCH_MODE=$1 BENCH_TMP="$TMP" timeout "$LIMIT" "$PY" - 2>"$TMP/bench_$1.err" <<'PY' | tee -a "$OUT"
import dataclasses, json, os, sys, time
from pathlib import Path
import torch
from torch.utils.flop_counter import FlopCounterMode
from abvid.model import ModelConfig, encoder_kwargs
from abvid.train import dist
from abvid.train.loop import seed_everything, train
from abvid.train.metrics import read_metrics
from abvid.train.objectives import ObjectiveConfig, build_objective

mode, tmp = os.environ["BENCH_MODE"], Path(os.environ["BENCH_TMP"])
steps, batch = int(os.environ.get("BENCH_STEPS", 60)), int(os.environ.get("BENCH_BATCH", 64))
cfg_file = Path("examples/configs/vit_s16_1gpu.yaml")
try:
    import yaml
    from abvid.pipeline.config import merge
    over = yaml.safe_load(cfg_file.read_text())
except ImportError:  # no PyYAML: the dataclass defaults (ViT-S/16 AB_DINO) plus BENCH_OVERRIDES
    over = {}
    merge = lambda cfg, d: dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    print(f"PyYAML missing: {cfg_file} not read; ViT-S/16 defaults of ModelConfig/ObjectiveConfig")
extra = json.loads(os.environ.get("BENCH_OVERRIDES") or "{}")   # e.g. a tiny model for a CPU dry run
for sec, kv in extra.items():
    over.setdefault(sec, {}).update(kv)
model_cfg = merge(ModelConfig(), over.get("model", {}))
obj_cfg = merge(ObjectiveConfig(), over.get("objective", {}))
ng, nl, G, L = 2, 4, 224, 96
if "data" in over:
    d = over["data"]; ng, nl = d.get("n_global", ng), d.get("n_local", nl); G, L = d.get("global_size", G), d.get("local_size", L)

@dataclasses.dataclass(frozen=True)
class TC:  # the TrainConfig fields the loop reads (abvid.train.config needs torchdata to import)
    steps: int = steps; batch_size: int = batch; lr: float = 5e-4; scale_lr: bool = True; min_lr: float = 1e-6
    warmup_steps: int = 10; weight_decay: float = 0.04; weight_decay_end: float = 0.4
    betas: tuple = (0.9, 0.999); momentum: float = 0.996; momentum_end: float = 1.0; teacher_temp: float = 0.04
    teacher_temp_end: float = 0.07; teacher_temp_warmup_steps: int = 30; clip_grad: float = 3.0; amp: bool = True
    compile: bool = os.environ.get("BENCH_COMPILE", "0") == "1"; find_unused_parameters: bool = False
    deterministic: bool = False; log_every: int = 10; ckpt_every: int = 10**9; keep_last: int = 1
    max_bad_steps: int = 10; seed: int = 0; device: str = os.environ.get("BENCH_DEVICE", "cuda"); threads: int = 0

def synthetic_batch(B: int) -> dict:
    g = torch.Generator().manual_seed(0); n = ng + nl
    hw = torch.rand(B, n, 2, generator=g) * 0.6 + 0.3
    pin = (lambda t: t.pin_memory()) if torch.cuda.is_available() else (lambda t: t)
    return {"global": pin(torch.randint(0, 256, (B, ng, 3, G, G), dtype=torch.uint8, generator=g)),
            "local": pin(torch.randint(0, 256, (B, nl, 3, L, L), dtype=torch.uint8, generator=g)),
            "boxes": torch.cat([torch.rand(B, n, 2, generator=g) * (1 - hw), hw], -1),
            "frame_idx": torch.randint(0, 16, (B, n), generator=g), "time_s": torch.zeros(B, n),
            "aug": torch.zeros(B, n, 8), "key": [f"k{i}" for i in range(B)], "labels": [[] for _ in range(B)],
            "clip_id": torch.arange(B)}

class Repeat:  # endless synthetic loader: the model-only bound (no decoding)
    def __init__(self, b): self.b = b
    def __iter__(self):
        while True: yield self.b

if mode == "synthetic":
    loader = Repeat(synthetic_batch(batch))
else:
    from abvid.pipeline.loader import DataConfig, build_loader
    shards = os.environ.get("SHARDS")
    if not shards:
        sys.path.insert(0, "tests"); from conftest import write_test_shards
        shards = str(tmp / "shards")
        write_test_shards(shards, videos=64, clips_per_video=4, clip_len=16, width=455, height=256, shard_clips=16)
    dcfg = merge(DataConfig(shards=shards), over.get("data", {}))
    dcfg = dataclasses.replace(dcfg, workers=min(dcfg.workers, max(1, (os.cpu_count() or 2) - 2)))
    loader = build_loader(dcfg, batch)

seed_everything(0)
obj = build_objective(obj_cfg, model_cfg)
cuda = TC().device == "cuda"
dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
# FLOPs of one training step (student fwd+bwd, teacher fwd, heads, value decoder), counted once.
probe = build_objective(obj_cfg, model_cfg).to(dev)
b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in synthetic_batch(batch).items()}
with FlopCounterMode(display=False) as fc, amp:
    loss, _ = probe.loss(b, teacher_temp=0.04); loss.backward()
flops = fc.get_total_flops(); del probe, b, loss
if cuda:
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
ctx = dist.DistContext(0, 1, 0, dev, None)
run = tmp / f"run_{mode}"
t0 = time.time()
s = train(obj, loader, TC(), run, ctx, {"bench": mode}, encoder_kwargs(model_cfg), resume=False)
rows = [r for r in read_metrics(run / "metrics.jsonl") if "event" not in r][1:]   # drop warm-up interval
mean = lambda k: sum(r[k] for r in rows) / max(len(rows), 1)
name = torch.cuda.get_device_name(0) if cuda else "cpu"
table = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12,
         "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "V100": 125e12}
peak = float(os.environ["PEAK_TFLOPS"]) * 1e12 if os.environ.get("PEAK_TFLOPS") else \
    next((v for k, v in table.items() if k in name), float("nan"))
step_t = mean("step_time_s")
res = {"bench": f"pretrain_vit_s16_{mode}", "gpu": name, "batch_per_gpu": batch, "views_per_step": batch * (ng + nl),
       "steps": steps, "views_per_s": round(mean("views_per_s"), 1), "step_time_s": round(step_t, 4),
       "data_wait_frac": round(mean("data_wait_frac"), 4), "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
       "gflop_per_step": round(flops / 1e9, 2), "achieved_tflops": round(flops / step_t / 1e12, 1),
       "peak_tflops_bf16": peak / 1e12, "mfu": round(flops / step_t / peak, 4), "final_loss": s["final_loss"],
       "status": s["status"], "compile": TC().compile, "wall_s": round(time.time() - t0, 1)}
print(json.dumps(res), flush=True)
PY
  local rc=${PIPESTATUS[0]}
  echo "benchmark ($1) exit: $rc" | tee -a "$OUT"
  if [ "$rc" != 0 ]; then tail -n 30 "$TMP/bench_$1.err" | tee -a "$OUT"; fi
}

run_bench synthetic
if [[ " $missing " == *" torchdata "* || " $missing " == *" webdataset "* || " $missing " == *" PIL "* || " $missing " == *" cv2 "* ]]; then
  echo "== benchmark (shards) skipped: needs torchdata, webdataset, pillow and opencv (missing: $missing)" | tee -a "$OUT"
else
  run_bench shards
fi
# The loader and embedding benchmarks of the same host (16 cores feed the GPU here, not 2).
if [[ " $missing " == *" av "* || " $missing " == *" torchdata "* || " $missing " == *" webdataset "* || " $missing " == *" cv2 "* ]]; then
  echo "== bench loader / bench embed skipped (missing: $missing)" | tee -a "$OUT"
else
  W=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
  echo "== bench loader (--workers $W; 2x224 + 4x96 views per clip)" | tee -a "$OUT"
  "$PY" - "$TMP/lshards" <<'PY' >/dev/null
import sys; sys.path.insert(0, "tests")
from conftest import write_test_shards
write_test_shards(sys.argv[1], videos=64, clips_per_video=4, clip_len=16, width=455, height=256, shard_clips=8)
PY
  timeout "$LIMIT" "$PY" -m abvid.tools.cli bench loader "$TMP/lshards" --workers "$W" --batch-size 64 \
      --batches 20 --rounds 2 2>&1 | tail -n 6 | tee -a "$OUT"
  for aug in false; do
    timeout "$LIMIT" "$PY" -m abvid.tools.cli bench loader "$TMP/lshards" --workers "$W" --batch-size 64 \
        --batches 20 --rounds 2 --set aug_in_loader=$aug 2>&1 | tail -n 2 | tee -a "$OUT"
  done
  echo "== bench embed (cuda, vit_small, 720p H.264, 4 fps, 224 px)" | tee -a "$OUT"
  "$PY" -m abvid.tools.cli toy-corpus "$TMP/toy720" --videos 1 --seconds 20 --size 1280x720 --fps 25 --seed 1 >/dev/null
  timeout "$LIMIT" "$PY" -m abvid.tools.cli bench embed "$TMP/toy720/toy_0000.mp4" --arch vit_small --device cuda \
      --copies 4 --batch-size 64 --repeat 2 2>&1 | tail -n 8 | tee -a "$OUT"
fi
echo "results in $OUT"
