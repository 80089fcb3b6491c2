"""Linear and k-NN probes of per-frame embeddings against labelled time segments.

Reads what ``abvid embed`` writes (``embeddings.npy`` (N, D) + ``index.csv``
with ``row,video_id,source,frame_index,pts_s``) and a label file: either the
annotation format (CSV ``video,start_s,end_s,label`` or JSONL with the same
keys; read by pipeline/annotations.py), or the whole-video shorthand
``video,label`` (CSV or JSONL; one row per label, so a video may have several).
Each frame takes every label whose segment ``[start_s, end_s)`` holds its pts
(every label of its video, with the shorthand); frames without a label are left
out. When every labelled frame has exactly one label the task is single-label
(metric: accuracy), otherwise multi-label (metric: mean average precision).

The train/test split is by video (seeded), so no frame of a test video is seen
in training: neighbouring frames are near duplicates, and a frame split would
measure memorisation, not features. It is stratified: videos are grouped by
their main label (the one most of their frames carry) and each group is split
with the test fraction, keeping at least one video of the group in training; a
class with a single video goes to training. A class that occurs in test but not
in training cannot be predicted by any probe: such classes are named in a
warning and left out of the score (their frames for accuracy, the classes for
mAP); when no test class occurs in training the probe refuses (ProbeError).

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
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from abvid.pipeline.annotations import Annotation, AnnotationError, Annotations, load_annotations
from abvid.pipeline.errors import UsageError


class ProbeError(UsageError):
    """The embeddings or labels cannot be probed (missing file, no overlap, one class...): exit 2."""


class ProbeWarning(UserWarning):
    """The probe ran, but part of its score means less than it seems (e.g. test classes unseen in training)."""


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


def load_labels(path: str | Path) -> Annotations:
    """Segment labels (the annotation format) or whole-video labels (``video,label``, CSV or JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"--labels {path} does not exist; give a CSV/JSONL with video,label (whole videos) or "
                         "video,start_s,end_s,label (segments)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeError(f"cannot read --labels {path}: {e}") from e
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        fields = set(rows[0]) if rows else set()
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ProbeError(f"{path}: not JSONL ({e}); one JSON object per line") from e
        fields = set(rows[0]) if rows and isinstance(rows[0], dict) else set()
    if {"video", "label"} <= fields and not fields & {"start_s", "end_s"}:
        return _whole_video_labels(path, rows)
    try:
        return load_annotations(path, text)                  # the text read above: one read of the file
    except AnnotationError as e:
        raise ProbeError(f"{e}; --labels takes video,label (whole videos) or video,start_s,end_s,label") from e


def _whole_video_labels(path: Path, rows: list) -> Annotations:
    out: dict[str, list[Annotation]] = {}
    for n, row in enumerate(rows, 2 if path.suffix.lower() == ".csv" else 1):
        video = row.get("video") if isinstance(row, dict) else None
        label = row.get("label") if isinstance(row, dict) else None
        if not isinstance(video, str) or not video.strip() or not isinstance(label, str) or not label.strip():
            raise ProbeError(f"{path}:{n}: a whole-video label row needs a non-empty 'video' and 'label', got {row!r}")
        out.setdefault(video.strip(), []).append(Annotation(0.0, math.inf, label.strip()))
    return Annotations(out, base=path.parent)


def main_labels(video_ids: list[str], labels: list[list[str]]) -> dict[str, str]:
    """Each video's main label: the one most of its labelled frames carry (ties: alphabetical)."""
    counts: dict[str, dict[str, int]] = {}
    for v, ls in zip(video_ids, labels):
        for l in ls:
            counts.setdefault(v, {}).setdefault(l, 0)
            counts[v][l] += 1
    return {v: min(c, key=lambda l: (-c[l], l)) for v, c in counts.items()}


def split_by_video(video_ids: list[str], test_fraction: float, seed: int,
                   strata: dict[str, str] | None = None) -> np.ndarray:
    """Boolean test mask over frames; whole videos go to one side, at least one video per side.

    With ``strata`` (video -> main label) the split is stratified: each label's videos are split
    with ``test_fraction``, at least one of them kept for training (a label's only video trains).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ProbeError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    videos = sorted(set(video_ids))
    if len(videos) < 2:
        raise ProbeError(f"the labelled frames come from {len(videos)} video(s); a by-video split needs at least 2")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {}                   # without strata: one group of every video
    for v in videos:
        groups.setdefault((strata or {}).get(v, ""), []).append(v)
    test_videos: set[str] = set()
    for _, group in sorted(groups.items()):
        order = rng.permutation(len(group))
        n_test = min(max(1, round(test_fraction * len(group))), len(group) - 1)
        test_videos |= {group[i] for i in order[:n_test]}
    if not test_videos:
        raise ProbeError(f"each of the {len(groups)} classes occurs in one video only, so a by-video split "
                         "cannot test a class it trained on; label at least two videos per class")
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
    labels = frame_labels(rows, load_labels(labels_path))
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
    test = torch.from_numpy(split_by_video(videos, test_fraction, seed, main_labels(videos, labels)))
    train = ~test
    unseen, scored = _unseen_test_classes(y, train, test, names, multilabel)
    if multilabel:
        chance = float(y[test][:, scored].mean(0)[y[test][:, scored].sum(0) > 0].mean())
    else:
        majority = int(torch.bincount(y[train], minlength=len(names)).argmax())
        test &= torch.isin(y, torch.tensor(scored))          # frames of unseen classes are not scored
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
        if multilabel:
            score = mean_average_precision(scores[:, scored], y[test][:, scored])
        else:
            score = accuracy(scores, y[test])
        results.append(ProbeResult(
            method=method, task="multi-label" if multilabel else "single-label",
            metric="mAP" if multilabel else "accuracy", score=score, chance=chance, classes=len(names),
            train_frames=int(train.sum()), test_frames=int(test.sum()),
            train_videos=len(set(vids[train.numpy()])), test_videos=len(set(vids[test.numpy()]))))
    out = Path(out_json) if out_json is not None else Path(emb_dir) / "probe.json"
    payload = {"embeddings": str(emb_dir), "labels": str(labels_path), "test_fraction": test_fraction,
               "seed": seed, "shuffled_labels": shuffle_labels, "classes": names,
               "unlabelled_frames": int((~keep).sum()), "unseen_test_classes": unseen,
               "results": [asdict(r) for r in results]}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
    return results


def _unseen_test_classes(y: torch.Tensor, train: torch.Tensor, test: torch.Tensor, names: list[str],
                         multilabel: bool) -> tuple[list[str], list[int]]:
    """(names of classes in test but never in training, indices of the classes that are scored).

    Warns when some test classes are unseen; refuses (ProbeError) when none of them was seen.
    """
    if multilabel:
        in_train, in_test = y[train].sum(0) > 0, y[test].sum(0) > 0
    else:
        in_train = torch.bincount(y[train], minlength=len(names)) > 0
        in_test = torch.bincount(y[test], minlength=len(names)) > 0
    unseen = [names[c] for c in range(len(names)) if in_test[c] and not in_train[c]]
    scored = [c for c in range(len(names)) if in_train[c]]
    if unseen and not (in_test & in_train).any():
        raise ProbeError(f"no class of the test videos occurs in the training videos (test classes: "
                         f"{', '.join(unseen[:8])}): any score would be 0. Label several videos per class, or "
                         "give whole-video labels that repeat across videos (video,label)")
    if unseen:
        warnings.warn(f"{len(unseen)} test class(es) never occur in the training videos and are left out of the "
                      f"score: {', '.join(unseen[:8])}{' ...' if len(unseen) > 8 else ''} (label more videos of "
                      "them)", ProbeWarning, stacklevel=3)
    return unseen, scored


def format_table(results: list[ProbeResult]) -> str:
    head = f"{'method':<8} {'task':<13} {'metric':<9} {'score':>7} {'chance':>7} {'classes':>7} " \
           f"{'train fr/vid':>13} {'test fr/vid':>12}"
    lines = [head, "-" * len(head)]
    for r in results:
        score = "nan" if math.isnan(r.score) else f"{r.score:.3f}"
        lines.append(f"{r.method:<8} {r.task:<13} {r.metric:<9} {score:>7} {r.chance:>7.3f} {r.classes:>7} "
                     f"{f'{r.train_frames}/{r.train_videos}':>13} {f'{r.test_frames}/{r.test_videos}':>12}")
    return "\n".join(lines)
