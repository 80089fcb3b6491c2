"""Pre-train an encoder: one command for CPU, one GPU, and torchrun (many GPUs, many nodes).

Examples:
  abvid pretrain examples/configs/tiny_cpu.yaml --out runs/tiny                  # CPU (or one GPU: auto)
  abvid pretrain examples/configs/vit_s16_1gpu.yaml --set data.shards=/data/shards --out runs/s16
  torchrun --nproc-per-node 8 -m abvid.tools.cli pretrain examples/configs/vit_s16_multinode.yaml \\
      --set data.shards='/data/shards/shard-{000000..000999}.tar' --out /shared/runs/s16
  # multi-node: the same torchrun line on every node, plus
  #   --nnodes N --rdzv-backend c10d --rdzv-endpoint HEAD_NODE:29500 --rdzv-id RUN_NAME

The YAML file holds overrides of the defaults (abvid.train.config); --set a.b=v
overrides the file. The resolved config goes to RUN_DIR/config.yaml, checkpoints
to RUN_DIR/checkpoints/, metrics to RUN_DIR/metrics.jsonl and the log to
RUN_DIR/train.log. Rerunning the same command resumes from the newest readable
checkpoint (--no-resume moves old checkpoints aside and starts over).
train.steps=0 writes an untrained checkpoint (a baseline to probe). On shared
file systems use the same --out on every node; rank 0 writes, every rank reads.

Exit codes: 0 done; 2 config / usage error; 3 training failed (diverged:
train.max_bad_steps non-finite steps in a row); 128+N stopped by signal N
(SIGTERM 143, SIGINT 130) after saving a checkpoint: rerun to resume.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from abvid.tools.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.yaml", nargs="?", default=None,
                   help="YAML file of overrides (omit to use the defaults plus --set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--out", metavar="RUN_DIR", default=None,
                   help="run folder (default runs/<config name>-<date>); reuse it to resume")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in RUN_DIR and start over")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def main(args: argparse.Namespace) -> int:
    import yaml

    from abvid.pipeline.config import ConfigError, load_config, to_dict
    from abvid.train.config import PretrainConfig, check_sizes, validate

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    validate(cfg.train)
    check_sizes(cfg)            # errors now; its warnings are logged when training starts
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return EXIT_OK
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: set it in the YAML file or with --set data.shards=PATH "
                          "(a folder of .tar shards, a glob or a brace pattern)")
    from abvid.pipeline.source import expand_shards
    try:  # fail here, before any process group or model exists, with the shard spec in the message
        expand_shards(cfg.data.shards, allow_pipe=cfg.data.allow_pipe)
    except ValueError as e:
        raise ConfigError(f"data.shards: {e}") from None
    run_dir = Path(args.out) if args.out else \
        Path("runs") / f"{Path(args.config).stem if args.config else 'pretrain'}-{time.strftime('%Y%m%d-%H%M%S')}"

    from abvid.train.checkpoint import CheckpointError
    from abvid.train.pretrain import pretrain

    try:
        summary = pretrain(cfg, run_dir, resume=not args.no_resume)
    except CheckpointError as e:
        print(f"abvid pretrain: {e}", file=sys.stderr)
        return EXIT_USAGE
    import torch.distributed as tdist
    rank = tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0
    if rank == 0:
        print(json.dumps(summary), flush=True)
    if summary["status"] == "diverged":
        return EXIT_FAILED
    if summary["status"] == "interrupted":
        return 128 + int(summary.get("signal") or 15)
    return EXIT_OK
