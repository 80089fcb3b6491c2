"""Pool finished ablations: a row's difference to its base over many (experiment, corpus) tables.

    python examples/pool_tables.py OUT/shapes OUT/crowd OTHER/shapes OTHER/crowd [--row ab] [--against base]

Each argument is an `abvid ablate --out` folder (its results-student.json, or results.json with
--which ema). One cell per folder: the mean of the row's per-seed paired differences against the
base method (or the row --against names) there; the summary is the mean over cells and its standard error, so the spread
between corpora counts, and seeds that share a corpus are not taken as independent. This answers
"how large is the row's difference across everything run", which no single table does; it is a
summary, not a test fixed in advance (docs/EXPERIMENTS.md uses it that way).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from abvid.train.ablation import PROBES, WHICH, pool, results_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="OUT", help="abvid ablate --out folders, one per table")
    p.add_argument("--row", default="ab", help="row compared with its base (default: ab)")
    p.add_argument("--against", default="base", help="row it is compared with, per seed (default: base; "
                   "e.g. ab for an ablation row)")
    p.add_argument("--which", choices=WHICH, default=WHICH[0], help="which encoder's results to read")
    args = p.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
