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
to RUN_DIR/checkpoints/, metrics to RUN_DIR/metrics.jsonl, the log to
RUN_DIR/train.log and, with TensorBoard installed (pip install 'abvid[tb]'),
scalars and a contact sheet of the first batch to RUN_DIR/tb. Without --out the run
folder is runs/<config file name> (runs/pretrain without a config file), so
rerunning the same command resumes from the newest readable checkpoint
(--no-resume moves old checkpoints aside and starts over). A resume with a config
that differs in keys that change what is learned is refused, naming them.
train.steps=0 writes an untrained checkpoint (a baseline to probe);
model.init_from=PATH starts from exported abvid or timm ViT weights. Unreadable
training data (truncated shards, frames that are not images, clip JSON missing a
field) is skipped, logged once per shard and counted as data_skipped in the
metrics; more than data.max_bad_fraction of the samples read stops the run.
On shared file systems use the same --out on every node; rank 0 writes, every
rank reads.

Exit codes: 0 done; 2 config / usage error (unknown key, bad value, no shards,
--out a file, train.device=cuda without a GPU, a checkpoint of another run or
format); 3 training failed (diverged: train.max_bad_steps non-finite steps in a
row; too much unreadable data; an unexpected error, whose traceback goes to a log
file); 128+N stopped by signal N (SIGTERM 143, SIGINT 130) after saving a
checkpoint: rerun to resume.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from abvid.pipeline.errors import UsageError
from abvid.tools.cli import EXIT_FAILED, EXIT_OK


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.yaml", nargs="?", default=None,
                   help="YAML file of overrides (omit to use the defaults plus --set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--out", metavar="RUN_DIR", default=None,
                   help="run folder (default: runs/<config file name>); rerun with the same folder to resume")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in RUN_DIR and start over")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_folder(out: str | None, config: str | None) -> Path:
    """--out, or runs/<config stem>: the same command always names the same folder, so a rerun resumes."""
    run_dir = Path(out) if out else Path("runs") / (Path(config).stem if config else "pretrain")
    for p in [run_dir, *run_dir.parents]:
        if p.exists() and not p.is_dir():
            what = "--out" if out else "the default run folder"
            raise UsageError(f"{what} {run_dir}: {p} is a file, not a folder; pass --out with a folder "
                             "(a new one to start, an earlier run's to resume)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {run_dir}: cannot create the run folder ({e.strerror}); pass a writable folder") from e
    return run_dir


def tensorboard_first_batch(run_dir: Path) -> Callable[[dict], None]:
    """A hook that draws the first batch (every view, as the model gets it) into RUN_DIR/tb."""
    def hook(batch: dict) -> None:
        import logging

        import numpy as np

        from abvid.tools.contact_sheet import batch_sheet
        from abvid.train.metrics import write_tb_image
        try:
            write_tb_image(run_dir, "data/first_batch", np.asarray(batch_sheet(batch)))
        except Exception as e:  # noqa: BLE001 -- a picture must never stop training
            logging.getLogger("abvid.train").warning("first-batch contact sheet not written: %s: %s",
                                                     type(e).__name__, e)
    return hook


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
    if cfg.model.init_from and not Path(cfg.model.init_from).is_file():
        raise ConfigError(f"model.init_from={cfg.model.init_from}: no such file; pass an `abvid export` file, a timm "
                          "ViT state dict (.safetensors / .pth) or a training checkpoint")
    from abvid.train.dist import pick_device
    pick_device(cfg.train.device)       # train.device=cuda without a GPU: a usage error before anything starts
    run_dir = run_folder(args.out, args.config)
    if not args.out:
        print(f"abvid pretrain: run folder {run_dir} (no --out given; rerun the same command to resume)",
              file=sys.stderr)

    from abvid.train.pretrain import pretrain

    summary = pretrain(cfg, run_dir, resume=not args.no_resume, on_first_batch=tensorboard_first_batch(run_dir))
    import torch.distributed as tdist
    rank = tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0
    if rank == 0:
        print(json.dumps(summary), flush=True)
    if summary["status"] == "diverged":
        return EXIT_FAILED
    if summary["status"] == "interrupted":
        return 128 + int(summary.get("signal") or 15)
    return EXIT_OK
