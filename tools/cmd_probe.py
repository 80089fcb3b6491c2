"""Probe embeddings with labelled segments: linear (logistic regression) and k-NN (cosine, DINO votes).

    abvid probe --embeddings emb/ --labels annotations.csv [--method linear knn] [--test-fraction 0.3]

Labels use the annotation format (CSV or JSONL: video,start_s,end_s,label); the
'video' column may be the source path, file name, stem or video_id. Each frame
takes the labels whose segment contains its pts; unlabelled frames are left
out. Single-label data is scored by accuracy, multi-label by mean average
precision. Train and test are split by video. Prints a table (with the chance
level beside each score) and writes probe.json in the embeddings folder.
"""
from __future__ import annotations

import argparse
import sys

from abvid.tools.cli import EXIT_OK, EXIT_USAGE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, metavar="DIR", help="output folder of `abvid embed`")
    p.add_argument("--labels", required=True, metavar="FILE", help="CSV/JSONL with video,start_s,end_s,label")
    p.add_argument("--method", nargs="+", choices=("linear", "knn"), default=["linear", "knn"],
                   help="probe(s) to run")
    p.add_argument("--test-fraction", type=float, default=0.3, help="fraction of videos held out for testing")
    p.add_argument("--seed", type=int, default=0, help="seed of the by-video split")
    p.add_argument("--k", type=int, default=20, help="neighbours of the k-NN probe")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature (DINO)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty of the linear probe")
    p.add_argument("--shuffle-labels", action="store_true",
                   help="control run: shuffle labels across frames (scores should fall to chance)")
    p.add_argument("--out", default=None, metavar="FILE", help="where to write probe.json (default: in --embeddings)")


def main(args: argparse.Namespace) -> int:
    from abvid.train.probe import ProbeError, format_table, run_probe

    try:
        results = run_probe(args.embeddings, args.labels, methods=tuple(args.method),
                            test_fraction=args.test_fraction, seed=args.seed, k=args.k,
                            temperature=args.temperature, weight_decay=args.weight_decay,
                            shuffle_labels=args.shuffle_labels, out_json=args.out)
    except ProbeError as e:
        print(f"abvid probe: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(format_table(results))
    return EXIT_OK
