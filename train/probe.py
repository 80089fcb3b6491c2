"""Linear and k-NN probes of per-frame embeddings against labelled time segments.

Reads what ``abvid embed`` writes (``embeddings.npy`` (N, D) + ``index.csv``
with ``row,video_id,source,frame_index,pts_s``) and a label file in the
annotation format (CSV ``video,start_s,end_s,label`` or JSONL with the same
keys; read by pipeline/annotations.py). Each frame takes every label whose
segment ``[start_s, end_s)`` holds its pts; frames without a label are left out. When every labelled frame has
exactly one label the task is single-label (metric: accuracy), otherwise
multi-label (metric: mean average precision over classes present in the test
set).

The train/test split is by video (seeded), so no frame of a test video is seen
in training: neighbouring frames are near duplicates, and a frame split would
measure memorisation, not features.

Probes (both standard, small, and fast on a CPU):

* ``linear``: logistic regression on standardised features (train mean/std),
  full-batch L-BFGS with a small L2 penalty; softmax for single-label,
  per-class sigmoid for multi-label.
* ``knn``: cosine k-NN with temperature-weighted votes, as in DINO
  (Caron et al. 2021, ``eval_knn.py``): weight ``exp(sim / T)``, ``k=20``,
  ``T=0.07``.

Run it::

    abvid probe --embeddings emb/ --labels toy/annotations.csv --method linear knn
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from abvid.pipeline.annotations import Annotation, AnnotationError, Annotations, load_annotations


class ProbeError(ValueError):
    """The embeddings or labels cannot be probed (missing file, no overlap, one class...)."""


@dataclass
class ProbeResult:
    method: str
    task: str            # "single-label" | "multi-label"
    metric: str          # "accuracy" | "mAP"
    score: float
    chance: float        # majority-class accuracy / mean test prevalence
    classes: int
    train_frames: int
    test_frames: int
    train_videos: int
    test_videos: int


# ----------------------------------------------------------------------------- inputs

def read_index(emb_dir: str | Path) -> tuple[np.ndarray, list[dict]]:
    """(embeddings memmap (N, D), index rows) of an ``abvid embed`` output folder."""
    emb_dir = Path(emb_dir)
    npy, idx = emb_dir / "embeddings.npy", emb_dir / "index.csv"
    for p in (npy, idx):
        if not p.is_file():
            raise ProbeError(f"{p} does not exist; run `abvid embed ... --out {emb_dir}` first")
    x = np.load(npy, mmap_mode="r")
    with idx.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != x.shape[0]:
        raise ProbeError(f"{idx} has {len(rows)} rows but {npy} has {x.shape[0]}; rerun `abvid embed`")
    return x, rows


def frame_labels(rows: list[dict], annotations: Annotations) -> list[list[str]]:
    """For every index row, the sorted labels whose segment ``[start_s, end_s)`` contains the frame's pts.

    A row's video is looked up by its source path (absolute, relative to the label
    file, file name or stem; pipeline/annotations.py), then by its video_id.
    """
    per_video: dict[tuple[str, str], list[Annotation]] = {}
    out = []
    for r in rows:
        key = (r["source"], r["video_id"])
        if key not in per_video:
            found = annotations.for_video(r["source"]) if r["source"] else []
            per_video[key] = [a for a in found or annotations.for_video(r["video_id"]) if a.label]
        t = float(r["pts_s"])
        out.append(sorted({a.label for a in per_video[key] if a.start_s <= t < a.end_s}))
    return out


def split_by_video(video_ids: list[str], test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask over frames; whole videos go to one side. At least one video per side."""
    if not 0.0 < test_fraction < 1.0:
        raise ProbeError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    videos = sorted(set(video_ids))
    if len(videos) < 2:
        raise ProbeError(f"the labelled frames come from {len(videos)} video(s); a by-video split needs at least 2")
    order = np.random.default_rng(seed).permutation(len(videos))
    n_test = min(max(1, round(test_fraction * len(videos))), len(videos) - 1)
    test_videos = {videos[i] for i in order[:n_test]}
    return np.array([v in test_videos for v in video_ids], dtype=bool)


# ----------------------------------------------------------------------------- probes

def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, *, multilabel: bool,
                 weight_decay: float = 1e-4, max_iter: int = 200) -> torch.Tensor:
    """Logistic regression; returns test scores (N_test, C) (probabilities).

    y_train: (N,) int64 class ids, or (N, C) float 0/1 for multi-label.
    """
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    classes = y_train.shape[1] if multilabel else int(y_train.max()) + 1
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(xtr.shape[1], classes, generator=gen) * 0.01).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = xtr @ w + b
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, y_train)
        else:
            loss = F.cross_entropy(logits, y_train)
        loss = loss + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits = xte @ w + b
        return torch.sigmoid(logits) if multilabel else logits.softmax(-1)


def knn_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, *, multilabel: bool,
              k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Cosine k-NN with DINO's exp(sim / T) weighted votes; returns test scores (N_test, C)."""
    classes = y_train.shape[1] if multilabel else int(y_train.max()) + 1
    targets = y_train.float() if multilabel else F.one_hot(y_train, classes).float()  # (N_train, C)
    xtr, xte = F.normalize(x_train, dim=1), F.normalize(x_test, dim=1)
    k = min(k, xtr.shape[0])
    out = []
    for i in range(0, xte.shape[0], chunk):
        sim = xte[i:i + chunk] @ xtr.T                               # (n, N_train)
        top, idx = sim.topk(k, dim=1)                                # (n, k)
        w = (top / temperature).exp()
        votes = (w.unsqueeze(-1) * targets[idx]).sum(1)              # (n, C)
        out.append(votes / w.sum(1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, classes)


# ----------------------------------------------------------------------------- metrics

def accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(1) == y).float().mean())


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class: mean precision at the rank of each positive (ties broken by order)."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(np.float64)
    if hits.sum() == 0:
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def mean_average_precision(scores: torch.Tensor, y: torch.Tensor) -> float:
    """mAP over the classes with at least one positive in ``y`` (N, C)."""
    s, t = scores.numpy(), y.numpy() > 0.5
    aps = [average_precision(s[:, c], t[:, c]) for c in range(t.shape[1]) if t[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


# ----------------------------------------------------------------------------- the job

def run_probe(emb_dir: str | Path, labels_path: str | Path, *, methods: tuple[str, ...] = ("linear", "knn"),
              test_fraction: float = 0.3, seed: int = 0, k: int = 20, temperature: float = 0.07,
              weight_decay: float = 1e-4, shuffle_labels: bool = False,
              out_json: str | Path | None = None) -> list[ProbeResult]:
    """Probe an embedding folder with a label file; writes ``probe.json`` (default: in ``emb_dir``)."""
    x_all, rows = read_index(emb_dir)
    try:
        annotations = load_annotations(labels_path)
    except AnnotationError as e:
        raise ProbeError(f"{e}; --labels takes the annotation format video,start_s,end_s,label") from e
    labels = frame_labels(rows, annotations)
    keep = np.array([bool(l) for l in labels])
    if not keep.any():
        raise ProbeError(f"no frame of {emb_dir} falls in a segment of {labels_path}; check that the label file's "
                         "'video' column names the embedded videos (path, file name, stem or video_id)")
    keep_idx = np.flatnonzero(keep)
    labels = [labels[i] for i in keep_idx]
    videos = [rows[i]["video_id"] for i in keep_idx]
    if shuffle_labels:  # a control: features can no longer predict labels, so the score should fall to chance
        perm = np.random.default_rng(seed + 1).permutation(len(labels))
        labels = [labels[i] for i in perm]
    x = torch.from_numpy(np.asarray(x_all[keep_idx], dtype=np.float32))
    names = sorted({l for ls in labels for l in ls})
    multilabel = any(len(ls) != 1 for ls in labels)
    col = {n: i for i, n in enumerate(names)}
    if multilabel:
        y = torch.zeros(len(labels), len(names))
        for i, ls in enumerate(labels):
            y[i, [col[l] for l in ls]] = 1.0
    else:
        y = torch.tensor([col[ls[0]] for ls in labels], dtype=torch.int64)
    if len(names) < 2:
        raise ProbeError(f"{labels_path} gives the embedded frames only one label ({names}); a probe needs >= 2")
    test = torch.from_numpy(split_by_video(videos, test_fraction, seed))
    train = ~test
    if multilabel:
        chance = float(y[test].mean(0)[y[test].sum(0) > 0].mean())
    else:
        majority = int(torch.bincount(y[train], minlength=len(names)).argmax())
        chance = float((y[test] == majority).float().mean())
    vids = np.array(videos)
    results = []
    for method in methods:
        if method == "linear":
            scores = linear_probe(x[train], y[train], x[test], multilabel=multilabel, weight_decay=weight_decay)
        elif method == "knn":
            scores = knn_probe(x[train], y[train], x[test], multilabel=multilabel, k=k, temperature=temperature)
        else:
            raise ProbeError(f"unknown probe method '{method}'; choose linear or knn")
        score = mean_average_precision(scores, y[test]) if multilabel else accuracy(scores, y[test])
        results.append(ProbeResult(
            method=method, task="multi-label" if multilabel else "single-label",
            metric="mAP" if multilabel else "accuracy", score=score, chance=chance, classes=len(names),
            train_frames=int(train.sum()), test_frames=int(test.sum()),
            train_videos=len(set(vids[train.numpy()])), test_videos=len(set(vids[test.numpy()]))))
    out = Path(out_json) if out_json is not None else Path(emb_dir) / "probe.json"
    payload = {"embeddings": str(emb_dir), "labels": str(labels_path), "test_fraction": test_fraction,
               "seed": seed, "shuffled_labels": shuffle_labels, "classes": names,
               "unlabelled_frames": int((~keep).sum()), "results": [asdict(r) for r in results]}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
    return results


def format_table(results: list[ProbeResult]) -> str:
    head = f"{'method':<8} {'task':<13} {'metric':<9} {'score':>7} {'chance':>7} {'classes':>7} " \
           f"{'train fr/vid':>13} {'test fr/vid':>12}"
    lines = [head, "-" * len(head)]
    for r in results:
        score = "nan" if math.isnan(r.score) else f"{r.score:.3f}"
        lines.append(f"{r.method:<8} {r.task:<13} {r.metric:<9} {score:>7} {r.chance:>7.3f} {r.classes:>7} "
                     f"{f'{r.train_frames}/{r.train_videos}':>13} {f'{r.test_frames}/{r.test_videos}':>12}")
    return "\n".join(lines)
