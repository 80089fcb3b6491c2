"""Run the seeded ablation of annotation bootstrapping and print its table (mean ± std over seeds).

    abvid ablate examples/configs/tiny_cpu.yaml --shards data/shards --probe data/probe_shards \\
        --labels data/probe/annotations.csv --out ablation/simclr --seeds 0 1 2 --jobs 2
    abvid ablate ... --set objective.name=dino           # another annotation source, same rows
    abvid ablate --table-only --out ablation/simclr       # rebuild the table from the run folders
    abvid ablate ... --which ema                          # probe the AB runs' EMA encoders as well

Rows (--rows, default all): random (untrained init), base (the plain base method), ab (AB,
gamma = 0), ab_gamma (AB, gamma = 0.5), ab_no_time (dt not in the action), ab_no_actions (Q blind
to the action), ab_no_target (bootstrap targets from the online network). Each (row, seed) is
`abvid pretrain` with train.seed = data.seed = seed, then `abvid embed` of the --probe videos or
shards (which pretraining should not see), then `abvid probe` (linear and k-NN, split by video
with --probe-seed). Finished runs (OUT/runs/ROW/seedK/probe-student.json) are not redone; an
interrupted run resumes. Writes OUT/table-student.md and OUT/results-student.json (differences
against the base method are per-seed paired: mean ± standard error).

--which picks the encoder each run is probed through: student (default) is the online encoder of
every run, the network the base method is probed through; ema is the EMA teacher where a run has
one (the AB rows) and the student where it has none (base, AB without target network). In short
runs the EMA encoder lags the student (docs/EXPERIMENTS.md, "the fourth experiment").
A second call with the other --which reuses the trained runs and writes its own files
(emb/, probe.json, table.md, results.json for ema).

Exit codes: 0 every run finished; 2 usage error; 3 some run failed (its log is named; the table
holds the runs that finished).
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from abvid.tools.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def add_arguments(p: argparse.ArgumentParser) -> None:
    from abvid.train.ablation import ROWS, WHICH

    p.add_argument("config", metavar="CONFIG.yaml", nargs="?", help="pretraining config of every run (required "
                   "unless --table-only)")
    p.add_argument("--shards", metavar="SHARDS", help="pretraining shards (data.shards of every run)")
    p.add_argument("--probe", metavar="INPUT", help="videos or shards to embed and probe (held out from --shards)")
    p.add_argument("--labels", metavar="FILE", help="labels of the probe videos (video,start_s,end_s,label)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="ablation folder (runs/, table-student.md, results-student.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds, one run per row each")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                   help=f"rows to run, of: {', '.join(ROWS)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable), e.g. --set objective.name=dino")
    p.add_argument("--probe-seed", type=int, default=0, help="seed of the probe's by-video split (same for all runs)")
    p.add_argument("--which", choices=WHICH, default=WHICH[0],
                   help="encoder to probe: student = every run's online encoder; ema = the EMA teacher "
                        "where a run has one, else its student. Trained runs are reused; files are kept apart")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses the config's threads + workers)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from finished run folders")


def main(args: argparse.Namespace) -> int:
    from abvid.pipeline.errors import UsageError
    from abvid.train.ablation import Plan, is_done, run_one, write_table

    out = Path(args.out)
    if args.table_only:
        if not (out / "runs").is_dir():
            raise UsageError(f"{out} holds no ablation runs (no {out / 'runs'} folder): run the ablation first")
        print(write_table(out, args.which))
        return EXIT_OK
    missing = [f for f, v in (("CONFIG.yaml", args.config), ("--shards", args.shards), ("--probe", args.probe),
                              ("--labels", args.labels)) if not v]
    if missing:
        raise UsageError(f"{', '.join(missing)} required (or --table-only)")
    for name, path in (("CONFIG.yaml", args.config), ("--labels", args.labels)):
        if not Path(path).is_file():
            raise UsageError(f"{name} {path} is not a file")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    plan = Plan(config=args.config, shards=args.shards, probe=args.probe, labels=args.labels, out=out,
                seeds=tuple(args.seeds), rows=tuple(args.rows), overrides=tuple(args.overrides),
                probe_seed=args.probe_seed, which=args.which)
    todo = [(r, s) for s in plan.seeds for r in plan.rows if not is_done(plan, r, s)]
    print(f"{len(plan.rows) * len(plan.seeds) - len(todo)} runs already done, {len(todo)} to run in {out}",
          flush=True)
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:      # each run is its own subprocesses
        futures = {pool.submit(run_one, plan, r, s, lambda m: print(m, flush=True)): (r, s) for r, s in todo}
        for f in as_completed(futures):
            try:
                f.result()
            except RuntimeError as e:
                failed.append(str(e))
                print(f"failed: {e}", file=sys.stderr, flush=True)
    print(write_table(out, args.which))
    if failed:
        print(f"abvid ablate: {len(failed)} run(s) failed; rerun the same command to retry them", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if plan.rows else EXIT_USAGE
