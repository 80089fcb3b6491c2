"""Probe embeddings with labels: linear (logistic regression) and k-NN (cosine, DINO votes).

    abvid probe --embeddings emb/ --labels annotations.csv [--method linear knn] [--test-fraction 0.3]
    abvid probe --embeddings emb/ --labels video_labels.csv          # video,label: whole-video labels

Labels: the annotation format (CSV or JSONL: video,start_s,end_s,label), where each
frame takes the labels whose segment contains its pts; or the shorthand video,label
(CSV or JSONL), where every frame of the video takes the label (repeat a row for a
second label). The 'video' column may be the source path, file name, stem or
video_id. Unlabelled frames are left out. Single-label data is scored by accuracy,
multi-label by mean average precision.

Train and test are split by video, stratified by each video's main label: every
class with two or more videos has videos on both sides, a class with one video
trains. Test classes that never occur in training are named in a warning and left
out of the score; when no test class occurs in training the probe refuses (a
score of 0 would say nothing about the features). Prints a table (with the
chance level beside each score) and writes probe.json in the embeddings folder.

Exit codes: 0 probed; 2 usage error (missing embeddings or label file, malformed
labels, labels matching no embedded video, fewer than two classes or videos,
no test class seen in training); 3 an unexpected error (a bug; the message
names a log file).
"""
from __future__ import annotations

import argparse
import sys
import warnings

from abvid.tools.cli import EXIT_OK


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, metavar="DIR", help="output folder of `abvid embed` (required)")
    p.add_argument("--labels", required=True, metavar="FILE",
                   help="CSV/JSONL with video,start_s,end_s,label (segments) or video,label (whole videos) (required)")
    p.add_argument("--method", nargs="+", choices=("linear", "knn"), default=["linear", "knn"],
                   help="probe(s) to run")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="fraction of each class's videos held out for testing")
    p.add_argument("--seed", type=int, default=0, help="seed of the by-video split")
    p.add_argument("--k", type=int, default=20, help="neighbours of the k-NN probe")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature (DINO)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty of the linear probe")
    p.add_argument("--shuffle-labels", action="store_true",
                   help="control run: shuffle labels across frames (scores should fall to chance)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to write probe.json (default: DIR/probe.json in --embeddings)")


def main(args: argparse.Namespace) -> int:
    from abvid.train.probe import ProbeWarning, format_table, run_probe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ProbeWarning)
        results = run_probe(args.embeddings, args.labels, methods=tuple(args.method),
                            test_fraction=args.test_fraction, seed=args.seed, k=args.k,
                            temperature=args.temperature, weight_decay=args.weight_decay,
                            shuffle_labels=args.shuffle_labels, out_json=args.out)
    for w in caught:
        if issubclass(w.category, ProbeWarning):
            print(f"abvid probe: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(format_table(results))
    return EXIT_OK
