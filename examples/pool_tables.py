"""Pool finished ablations: a row's difference to its base over many (experiment, corpus) tables.

    python examples/pool_tables.py OUT/shapes OUT/crowd OTHER/shapes OTHER/crowd [--row ab] [--against base]
    python examples/pool_tables.py OUT/c*/crowd --bar-power 1.3 1.7 [--bar-seeds 3 10 30]

Each argument is an `abvid ablate --out` folder (its results-student.json, or results.json with
--which ema). One cell per folder: the mean of the row's per-seed paired differences against the
base method (or the row --against names) there; the summary is the mean over cells and its standard error, so the spread
between corpora counts, and seeds that share a corpus are not taken as independent. This answers
"how large is the row's difference across everything run", which no single table does; it is a
summary, not a test fixed in advance (docs/EXPERIMENTS.md uses it that way).

--bar-power SD_LINEAR SD_KNN adds a model's answer to "how often would one N-seed table on a fresh
corpus clear the per-table bar (mean paired difference above twice its SE), if the row's gain is what
these tables measure?": a corpus' gain varies as the cells do (less the seed part), each seed adds
noise of the given SD (mAP points; the per-seed SD of paired differences within one table, measured
elsewhere, e.g. a ten-seed table). See abvid.train.ablation.bar_pass_rate for the assumptions.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from abvid.train.ablation import PROBES, WHICH, bar_pass_rate, pool, results_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="OUT", help="abvid ablate --out folders, one per table")
    p.add_argument("--row", default="ab", help="row compared with its base (default: ab)")
    p.add_argument("--against", default="base", help="row it is compared with, per seed (default: base; "
                   "e.g. ab for an ablation row)")
    p.add_argument("--which", choices=WHICH, default=WHICH[0], help="which encoder's results to read")
    p.add_argument("--bar-power", nargs=2, type=float, metavar=("SD_LINEAR", "SD_KNN"),
                   help="per-seed SD of the paired differences within one table (mAP points): also print how "
                        "often one table on a fresh corpus would clear the per-table bar (a model; see above)")
    p.add_argument("--bar-seeds", nargs="+", type=int, default=[3, 10, 30], metavar="N",
                   help="seeds per table for --bar-power (default: 3 10 30)")
    args = p.parse_args(argv)
    if args.bar_power and (min(args.bar_power) < 0 or min(args.bar_seeds) < 2):
        p.error("--bar-power takes two SDs >= 0 and --bar-seeds numbers >= 2")
    tables = []
    for folder in args.folders:
        path = results_path(Path(folder), args.which)
        if not path.is_file():
            print(f"error: {path} does not exist (run `abvid ablate --table-only --out {folder}` "
                  f"to write it from the run folders)", file=sys.stderr)
            return 2
        tables.append(json.loads(path.read_text()))
    pooled = pool(tables, args.row, args.against)
    for probe in PROBES:
        s = pooled.get(probe)
        if s is None:
            print(f"{probe}: no table has both {args.row} and {args.against}")
            continue
        print(f"{probe}: {args.row} - {args.against} {100 * s['mean']:+.2f} ± {100 * s['se']:.2f} mAP points "
              f"(mean ± SE over {s['n']} tables; above 0 in {s['above_0']})")
    if args.bar_power:
        sd = tuple(x / 100 for x in args.bar_power)
        for n in args.bar_seeds:
            try:
                r = bar_pass_rate(pooled, sd, seeds=n)
            except ValueError as e:
                print(f"error: --bar-power: {e}", file=sys.stderr)
                return 2
            print(f"bar power, {n} seeds per table: clears linear {r['linear']:.0%}, k-NN {r['knn']:.0%}, "
                  f"both {r['both']:.0%} of fresh corpora (model: gain SD between corpora "
                  f"{100 * r['corpus_sd'][0]:.2f} / {100 * r['corpus_sd'][1]:.2f}, probes correlated {r['rho']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
