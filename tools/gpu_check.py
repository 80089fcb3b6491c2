"""The measuring part of ``tools/gpu_check.sh``: one table of training speed on this host's GPU.

    bash tools/gpu_check.sh [RESULTS.md]                     # deps from $WHEELS, this, then pytest -m gpu
    python -m abvid.tools.gpu_check --out RESULTS.md         # this part alone
    python -m abvid.tools.gpu_check --dry-run --out x.md     # CPU, tiny model: checks the script (tests do this)

Rows (``abvid pretrain``'s real loop, train/loop.py: bf16 autocast, fused AdamW, EMA, metrics):

* ViT-S/16 (examples/configs/vit_s16_1gpu.yaml) and ViT-B/16 (vit_b16_multinode.yaml, one GPU) AB_DINO,
  2 x 224 + 4 x 96 views, 64 clips per step, on an in-memory pinned batch (the model-only bound), with
  ``train.compile`` off and on (per module, train/compile.py);
* ViT-S/16 fed from real shards (``abvid toy-corpus`` + ``abvid preprocess``, made here while the
  first rows run) with ``data.decode_on=workers`` (CPU decoding) and ``=device`` (nvJPEG, gpu_views.py).

After the table, one line: ``abvid bench embed`` of ViT-S/16 at 224 px on the same toy videos with one
decoder process per spare core, against min(decode-only with those processes, model-only).

Columns: views/s, seconds per step and data-wait fraction are the loop's own (train/metrics.py) over
the steps after the first two logging intervals; TFLOP/s and MFU follow train/flops.py (counted FLOPs
per step / step time / the card's dense bf16 peak; ``PEAK_TFLOPS`` overrides the table); peak GiB is
``torch.cuda.max_memory_allocated``; "first s" is the first interval's wall time (compiling included).
Each row runs in a child process under ``--time-limit`` seconds, so a compile that does not finish
becomes a row saying so, with the time it had. The file holds one line naming the card, host, torch and
commit, then a markdown table the README can take as it is.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"vit_small": "vit_s16_1gpu.yaml", "vit_base": "vit_b16_multinode.yaml"}
NAMES = {"vit_small": "ViT-S/16", "vit_base": "ViT-B/16"}
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8", "model.img_size=32",
        "data.global_size=32", "data.local_size=16", "objective.num_prototypes=64", "objective.head_hidden_dim=64",
        "objective.head_bottleneck_dim=16", "objective.decoder_dim=32", "objective.decoder_depth=1",
        "objective.decoder_heads=2", "data.shuffle_buffer=8", "data.n_local=2", "train.threads=1"]
COLUMNS = ("card", "run", "compile", "data", "views/s", "s/step", "TFLOP/s", "MFU", "peak GiB", "data-wait",
           "first s", "status")


def _synthetic_batch(B: int, ng: int, G: int, nl: int, L: int, pin: bool) -> dict:
    """Random views in the loader's layout (uint8, channels-last, pinned on CUDA hosts) and view parameters."""
    import torch
    from abvid.tools.bench.train import random_batch

    b = random_batch(B, ng, G, nl, L, "cpu")
    for key in ("global", "local"):
        x = b[key].permute(0, 1, 3, 4, 2).contiguous()                     # (B, n, S, S, 3) memory
        b[key] = (x.pin_memory() if pin else x).permute(0, 1, 4, 2, 3)
    b["aug"] = torch.zeros_like(b["aug"])
    return b


class _Repeat:
    """Endless loader of one batch: the model-only bound (no decoding, no state)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def measure(spec: dict) -> dict:
    """One row: build the config's objective, count its step's FLOPs, train ``steps`` steps, read the metrics."""
    import contextlib

    import torch
    from abvid.model import encoder_kwargs
    from abvid.pipeline.config import load_config, to_dict
    from abvid.pipeline.loader import build_loader
    from abvid.train import dist, flops
    from abvid.train.config import PretrainConfig
    from abvid.train.loop import seed_everything, train
    from abvid.train.metrics import read_metrics
    from abvid.train.objectives import build_objective
    from abvid.train.pretrain import device_transform

    cuda = spec["device"] == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    over = [f"train.steps={spec['steps']}", f"train.log_every={spec['log_every']}", "train.ckpt_every=1000000000",
            "train.keep_last=1", f"train.compile={str(spec['compile']).lower()}", f"train.device={spec['device']}",
            f"train.batch_size={spec['batch']}", "train.warmup_steps=10", "train.teacher_temp_warmup_steps=30",
            f"data.decode_on={spec['decode_on']}", f"data.workers={spec['workers']}",
            f"data.shards={spec.get('shards') or '/nonexistent'}"] + (TINY if spec["dry_run"] else [])
    cfg = load_config(PretrainConfig, ROOT / "examples" / "configs" / CONFIGS[spec["arch"]], over)
    d = cfg.data
    seed_everything(0)
    obj = build_objective(cfg.objective, cfg.model).to(device)
    batch = _synthetic_batch(spec["batch"], d.n_global, d.global_size, d.n_local, d.local_size, cuda)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    step_flops = flops.step_flops(obj, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()},
                                  teacher_temp=0.04, autocast=autocast)
    loader = _Repeat(batch) if spec["data"] == "synthetic" else build_loader(d, spec["batch"])
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = Path(spec["run_dir"])
    ctx = dist.DistContext(0, 1, 0, device, None)
    summary = train(obj, loader, cfg.train, run, ctx, to_dict(cfg), encoder_kwargs(cfg.model), resume=False,
                    on_device=device_transform(d, device))
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "event" not in r]
    steady = rows[2:] or rows[-1:]
    mean = lambda k: sum(r[k] for r in steady) / len(steady)              # noqa: E731
    step_s = mean("step_time_s")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak, _ = flops.device_peak(device, float(os.environ["PEAK_TFLOPS"]) if os.environ.get("PEAK_TFLOPS") else None)
    mfu = flops.mfu(step_flops, step_s, peak)
    return {"card": name, "views_per_s": mean("views_per_s"), "step_s": step_s, "data_wait": mean("data_wait_frac"),
            "tflops": step_flops / step_s / 1e12, "mfu": mfu, "flops_per_step": step_flops,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "first_s": rows[0]["step_time_s"] * spec["log_every"] if rows else None,
            "status": summary["status"], "final_loss": summary["final_loss"]}


def _child(spec: dict, limit: float) -> dict:
    """``measure(spec)`` in a child process under a time limit; failures become rows that say what happened."""
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "abvid.tools.gpu_check", "--one", json.dumps(spec)],
                           capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {limit:g} s (compiling?)" if spec["compile"] else
                f"timeout after {limit:g} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed (exit {r.returncode}, {time.time() - t0:.0f} s): {tail[:160]}"}
    return json.loads(lines[-1])


def _fmt(v, spec: str = "{:,.0f}") -> str:
    return "-" if v is None else spec.format(v)


def table_row(spec: dict, res: dict) -> str:
    views = f"{spec['views'][0]}x{spec['views'][1]} + {spec['views'][2]}x{spec['views'][3]}"
    run = f"{NAMES[spec['arch']]} AB_DINO, {spec['batch']} clips ({views})" + (" [dry run]" if spec["dry_run"] else "")
    data = ("in-memory" if spec["data"] == "synthetic" else "shards, GPU decode (nvJPEG)"
            if spec["decode_on"] == "device" else f"shards, CPU decode ({spec['workers']} workers)")
    cells = [res.get("card", "-"), run, "on" if spec["compile"] else "off", data, _fmt(res.get("views_per_s")),
             _fmt(res.get("step_s"), "{:.3f}"), _fmt(res.get("tflops"), "{:.3g}"), _fmt(res.get("mfu"), "{:.1%}"),
             _fmt(res.get("peak_gib"), "{:.1f}"), _fmt(res.get("data_wait"), "{:.3f}"),
             _fmt(res.get("first_s"), "{:.0f}"), res.get("status", "-")]
    return "| " + " | ".join(cells) + " |"


def _make_shards(work: Path, dry_run: bool) -> subprocess.Popen:
    """Start toy-corpus + preprocess in the background (CPU work, overlapping the in-memory rows)."""
    cli = f"{sys.executable} -m abvid.tools.cli"
    n, size, secs = (4, "96x64", 2) if dry_run else (32, "456x256", 8)
    shard_size = 64 if dry_run else 256
    script = (f"{cli} toy-corpus {work}/corpus --videos {n} --seconds {secs} --size {size} --seed 0 && "
              f"{cli} preprocess {work}/corpus --out {work}/shards --fps 4 --size {shard_size} --clip-len 8 "
              f"--shard-clips 8 --no-progress")
    return subprocess.Popen(["bash", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m abvid.tools.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_results.md", help="results file (markdown)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, few steps: checks the script only")
    p.add_argument("--steps", type=int, default=None, help="training steps per row (default 40; dry run 4)")
    p.add_argument("--batch", type=int, default=None, help="clips per step (default 64; dry run 4)")
    p.add_argument("--time-limit", type=float, default=150.0, help="seconds per row (a row past it says so)")
    p.add_argument("--archs", default="vit_small,vit_base")
    p.add_argument("--compile", default=None, help="off,on (default; dry run: off)")
    p.add_argument("--parts", default="synthetic,shards,embed",
                   help="synthetic (in-memory rows), shards (data rows), embed (abvid bench embed --workers)")
    p.add_argument("--shards", default=None, help="existing shards for the data rows (default: made here)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)      # child: one row as JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))), flush=True)
        return 0
    dry = args.dry_run
    compiles = [c == "on" for c in (args.compile or ("off" if dry else "off,on")).split(",")]
    parts = set(args.parts.split(","))
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        return _run(args, work, dry, parts, compiles)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, dry: bool, parts: set[str], compiles: list[bool]) -> int:
    steps, batch = args.steps or (4 if dry else 40), args.batch or (4 if dry else 64)
    cores = os.cpu_count() or 2
    prep = _make_shards(work, dry) if parts & {"shards", "embed"} and not args.shards else None
    views = (2, 32, 2 if dry else 4, 16) if dry else (2, 224, 4, 96)
    base = {"device": "cpu" if dry else "cuda", "dry_run": dry, "steps": steps, "batch": batch, "views": views,
            "log_every": max(1, steps // 8), "decode_on": "workers", "workers": 0 if dry else min(12, max(1, cores - 2))}
    lines, started = [], time.time()
    specs = []
    if "synthetic" in parts:
        specs += [{**base, "arch": a, "compile": c, "data": "synthetic"} for a in args.archs.split(",") for c in compiles]
    for spec in specs:
        spec["run_dir"] = str(work / f"run{len(lines)}")
        res = _child(spec, args.time_limit)
        lines.append(table_row(spec, res))
        print(lines[-1], flush=True)
    if "shards" in parts:
        shards = args.shards or str(work / "shards")
        if prep is not None and prep.wait() != 0:
            lines.append(f"| - | shards | - | - | - | - | - | - | - | - | - | toy-corpus/preprocess failed: "
                         f"{(prep.stderr.read().strip().splitlines() or ['?'])[-1][:160]} |")
        else:
            for decode_on in ("workers", "device"):
                spec = {**base, "arch": "vit_small", "compile": False, "data": "shards", "decode_on": decode_on,
                        "shards": shards, "run_dir": str(work / f"shards_{decode_on}")}
                lines.append(table_row(spec, _child(spec, args.time_limit)))
                print(lines[-1], flush=True)
    tail = _embed_line(work / "corpus", dry, cores, args.time_limit, prep) if "embed" in parts else ""
    header = _header(dry, time.time() - started)
    Path(args.out).write_text(header + "\n\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
                              + "\n".join(lines) + "\n" + tail)
    print(f"results in {args.out}")
    return 0


def _embed_line(corpus: Path, dry: bool, cores: int, limit: float, prep: subprocess.Popen | None) -> str:
    """``abvid bench embed`` of ViT-S/16 with one decoder process per spare core on the toy corpus made here
    (issue 12: >= 0.8 of min(decode-only with the same workers, model-only)); its JSON line, as a paragraph."""
    if prep is not None and prep.wait() != 0 or not corpus.is_dir():
        why = "toy-corpus failed" if prep is not None else "--shards given: the embed line needs the corpus made here"
        return f"\nembed: no corpus to embed ({why})\n"
    workers = 2 if dry else max(1, cores - 2)
    arch, size, device = ("vit_tiny", 32, "cpu") if dry else ("vit_small", 224, "cuda")
    cmd = ["bench", "embed", str(corpus), "--arch", arch, "--size", str(size), "--workers", str(workers),
           "--batch-size", "128", "--device", device, "--repeat", "1" if dry else "2"]
    shown = "abvid " + " ".join(cmd[:2] + ["CORPUS"] + cmd[3:])
    try:
        r = subprocess.run([sys.executable, "-m", "abvid.tools.cli", *cmd], capture_output=True, text=True,
                           timeout=limit)
    except subprocess.TimeoutExpired:
        return f"\n`{shown}`: did not finish within {limit:.0f} s\n"
    js = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not js:
        return f"\n`{shown}`: failed (exit {r.returncode}): {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}\n"
    d = json.loads(js[-1])
    print(js[-1], flush=True)
    return (f"\n`{shown}` ({d['videos']} toy videos): {d['throughput']:,.1f} frames/s vs bound {d['bound']:,.1f} "
            f"({d['bound_rule']}; decode-only {d['decode_fps']:,.1f}, model-only {d['model_fps']:,.1f}): "
            f"**ratio {d['ratio']:.2f}**\n")


def _header(dry: bool, seconds: float) -> str:
    import torch

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True,
                           text=True).stdout.strip()
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry else "cpu (dry run)"
    return (f"`tools/gpu_check.sh` on **{card}**, {os.cpu_count()} host cores, torch {torch.__version__}, "
            f"commit {commit}{' (+ local changes)' if dirty else ''}, {time.strftime('%Y-%m-%d')}; "
            f"rows took {seconds:.0f} s. MFU = counted FLOPs per step / step time / dense bf16 peak (train/flops.py).")


if __name__ == "__main__":
    sys.exit(main())
