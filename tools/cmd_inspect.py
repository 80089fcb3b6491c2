"""Summarise shards and draw a contact sheet of a few clips with their sampled views.

    abvid inspect shards/ [--out sheet.png] [--clips 4] [--frames 8] [--seed 0]

SHARDS: .tar files, folders of them, globs or brace patterns. Prints a table:
shards, clips, videos, frames, frame sizes, corpus and source fps, durations
per video, annotation coverage (share of frames inside a labelled segment) and
the most frequent labels; plus the status counts of the preprocessing manifests
in the given folders (every ``*manifest.jsonl``: ``manifest.jsonl`` and one
``<prefix>-manifest.jsonl`` per --prefix / --slice run). With --out, writes a PNG
contact sheet: for --clips clips (seeded pick, different videos first) the frames
in time order with the views of pipeline.views.ViewSampler drawn as boxes, and
the views rendered as the model gets them. The sampler has the default data.*
settings, or those of a pre-training config given with --config / --set.

Warnings (on stderr, the job still succeeds) where training on these shards with
that config would quietly do something else than it seems: frames whose short side
is smaller than data.global_size or data.local_size (every such view is upscaled
from fewer pixels), and a corpus with fewer clips than train.batch_size (the
endless training stream repeats clips within a batch, so SimCLR-style negatives
include copies of the positive's clip).

Exit codes: 0 done (also with warnings); 2 usage error (no shards found, bad
config key); 3 no clip of the shards could be drawn (every chosen clip corrupt),
or an unexpected error (a bug; the message names a log file).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from abvid.tools.cli import EXIT_FAILED, EXIT_OK


@dataclass
class ShardStats:
    shards: int = 0
    bytes: int = 0
    clips: int = 0
    frames: int = 0
    bad_clips: int = 0
    sizes: Counter = field(default_factory=Counter)          # (w, h) -> clips
    fps: Counter = field(default_factory=Counter)            # corpus fps -> clips
    source_fps: list[float] = field(default_factory=list)    # one per video
    clip_len: Counter = field(default_factory=Counter)
    codecs: Counter = field(default_factory=Counter)         # per video
    span: dict = field(default_factory=dict)                 # video_id -> [first pts, last pts, fps]
    labelled_frames: int = 0
    label_frames: Counter = field(default_factory=Counter)   # label -> frames inside one of its segments
    annotated_videos: set = field(default_factory=set)

    def add(self, meta: dict) -> None:
        pts = [float(t) for t in meta["pts_s"]]
        vid = meta["video_id"]
        self.clips += 1
        self.frames += len(pts)
        self.clip_len[len(pts)] += 1
        self.sizes[(int(meta["width"]), int(meta["height"]))] += 1
        self.fps[float(meta["fps"])] += 1
        if vid not in self.span:
            self.span[vid] = [min(pts), max(pts), float(meta["fps"])]
            if meta.get("source_fps"):
                self.source_fps.append(float(meta["source_fps"]))
            self.codecs[meta.get("codec") or "?"] += 1
        else:
            s = self.span[vid]
            s[0], s[1] = min(s[0], *pts), max(s[1], *pts)
        anns = meta.get("annotations") or []
        if anns:
            self.annotated_videos.add(vid)
        for t in pts:
            inside = [a for a in anns if a["start_s"] <= t <= a["end_s"]]
            self.labelled_frames += bool(inside)
            for name in {a.get("label") or a.get("text") or "" for a in inside} - {""}:
                self.label_frames[name] += 1

    def durations(self) -> list[float]:
        """Seconds covered per video: last - first pts plus one frame interval."""
        return [last - first + 1.0 / fps for first, last, fps in self.span.values()]


def scan(urls: list[str]) -> tuple[ShardStats, list[tuple[str, str, str]]]:
    """One pass over all samples: stats, and (url, key, video_id) of every clip."""
    from abvid.pipeline.source import group_samples, tar_members

    stats, clips = ShardStats(shards=len(urls)), []
    stats.bytes = sum(Path(u).stat().st_size for u in urls if Path(u).is_file())
    for s in group_samples()(tar_members()(urls)):
        try:
            meta = json.loads(s["json"])
            stats.add(meta)
        except (KeyError, ValueError, TypeError) as e:
            warnings.warn(f"shard {s['__url__']}, key {s['__key__']}: bad clip JSON ({type(e).__name__}: {e})")
            stats.bad_clips += 1
            continue
        clips.append((s["__url__"], s["__key__"], meta["video_id"]))
    return stats, clips


def pick_clips(clips: list[tuple[str, str, str]], n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` clips in a seeded random order, one per video before any video repeats."""
    order = np.random.default_rng(seed).permutation(len(clips))
    first, rest, seen = [], [], set()
    for i in order:
        (rest if clips[i][2] in seen else first).append(clips[i])
        seen.add(clips[i][2])
    return (first + rest)[:n]


def read_clips(wanted: list[tuple[str, str, str]]) -> list[tuple[str, dict, dict[int, tuple[str, bytes]]]]:
    """(key, meta, {frame number: (ext, bytes)}) of the wanted clips, in the wanted order."""
    from abvid.pipeline.source import group_samples, tar_members

    keys = {(u, k) for u, k, _ in wanted}
    found = {}
    for s in group_samples()(tar_members()(sorted({u for u, _, _ in wanted}))):
        if (s["__url__"], s["__key__"]) in keys:
            frames = {}
            for suffix, data in s.items():
                num, _, ext = suffix.partition(".")
                if num.isdigit() and ext in ("jpg", "jpeg", "webp"):
                    frames[int(num)] = (ext, data)
            found[(s["__url__"], s["__key__"])] = (s["__key__"], json.loads(s["json"]), frames)
    return [found[(u, k)] for u, k, _ in wanted if (u, k) in found and sorted(found[(u, k)][2]) ==
            list(range(len(found[(u, k)][2]))) and found[(u, k)][2]]


def _range(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(min(values))} / {fmt.format(statistics.median(values))} / {fmt.format(max(values))}"


def format_stats(st: ShardStats, manifest: Counter | None) -> str:
    d = st.durations()
    cover = st.labelled_frames / st.frames if st.frames else 0.0
    top = ", ".join(f"{k} ({v / st.frames:.0%})" for k, v in st.label_frames.most_common(8)) or "-"
    sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in st.sizes.most_common(4))
    rows = [
        ("shards", f"{st.shards} ({st.bytes / 1e6:.1f} MB)"),
        ("clips", f"{st.clips}" + (f" (+{st.bad_clips} unreadable)" if st.bad_clips else "")),
        ("videos", f"{len(st.span)}"),
        ("frames", f"{st.frames} (frames/clip: {', '.join(f'{k} x{v}' for k, v in sorted(st.clip_len.items()))})"),
        ("frame size", sizes or "-"),
        ("corpus fps", ", ".join(f"{f:g} ({n} clips)" for f, n in st.fps.most_common()) or "-"),
        ("source fps min/med/max", _range(st.source_fps, "{:.2f}")),
        ("video duration s min/med/max", _range(d) + (f"  (total {sum(d) / 3600:.2f} h)" if d else "")),
        ("codecs", ", ".join(f"{c} ({n})" for c, n in st.codecs.most_common()) or "-"),
        ("annotation coverage", f"{cover:.1%} of frames, {len(st.annotated_videos)}/{len(st.span)} videos"),
        ("labels (share of frames)", top),
    ]
    if manifest:
        rows.append(("manifest", ", ".join(f"{k} {v}" for k, v in manifest.most_common())))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def read_manifest(specs: list[str]) -> Counter | None:
    """Status counts over every ``*manifest.jsonl`` in the given folders: ``manifest.jsonl`` and the
    ``<prefix>-manifest.jsonl`` of ``abvid preprocess --prefix / --slice`` runs; None when there is none.

    A line that is not a JSON object (torn by a run still writing) is skipped with a warning naming
    file:line.
    """
    paths = sorted({p.resolve() for spec in specs if Path(spec).is_dir()
                    for p in Path(spec).glob("*manifest.jsonl") if p.is_file()})
    if not paths:
        return None
    counts: Counter = Counter()
    for path in paths:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                warnings.warn(f"{path}:{n}: skipping a manifest row that is not a JSON object "
                              "(torn by a run still writing?)")
                continue
            counts[row.get("status", "?")] += 1
    return counts


def corpus_warnings(st: ShardStats, global_size: int, local_size: int, batch_size: int) -> list[str]:
    """What a training run on these shards would quietly do that a user should know about."""
    out = []
    if st.sizes:
        short = min(min(w, h) for w, h in st.sizes)
        small = sum(n for (w, h), n in st.sizes.items() if min(w, h) < global_size)
        if short < global_size or short < local_size:
            out.append(f"frames as small as {short} px (short side; {small} of {st.clips} clips below "
                       f"data.global_size={global_size}) are smaller than the views drawn from them: every global view "
                       f"is upscaled from at most {short} px. Preprocess with --size >= {global_size}, or lower "
                       "data.global_size / data.local_size")
    if 0 < st.clips < batch_size:
        out.append(f"only {st.clips} clips for a batch of train.batch_size={batch_size}: the training stream repeats "
                   "clips within a batch (false negatives for SimCLR-style objectives); use more clips "
                   "(shorter --clip-len at preprocessing) or a smaller batch")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", nargs="+", metavar="SHARDS", help="shard files, folders, globs or brace patterns")
    p.add_argument("--out", default=None, metavar="PNG", help="write a contact sheet to this PNG (default: none)")
    p.add_argument("--clips", type=int, default=4, help="clips on the contact sheet")
    p.add_argument("--frames", type=int, default=8, help="frames shown per clip (at least those the views use)")
    p.add_argument("--thumb", type=int, default=96, help="thumbnail height in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the clip pick and of the view sampler")
    p.add_argument("--config", default=None, metavar="CONFIG.yaml",
                   help="draw views and check sizes with this pre-training config's data.* and train.batch_size "
                        "(default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. data.n_local=6 (repeatable)")


def main(args: argparse.Namespace) -> int:
    from abvid.pipeline.config import load_config
    from abvid.pipeline.source import expand_shards
    from abvid.train.config import PretrainConfig

    urls = expand_shards(args.shards)          # ShardSpecError (a UsageError): exit 2, naming the spec
    # read the config first: a bad key fails before the scan (ConfigError -> exit 2 in cli.py)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    sampler = cfg.data.view_sampler()
    stats, clips = scan(urls)
    print(format_stats(stats, read_manifest(args.shards)))
    for msg in corpus_warnings(stats, cfg.data.global_size, cfg.data.local_size, cfg.train.batch_size):
        print(f"abvid inspect: warning: {msg}", file=sys.stderr)
    if args.out:
        if not clips:
            print("abvid inspect: no readable clip to draw", file=sys.stderr)
            return EXIT_FAILED
        from abvid.tools.contact_sheet import draw_sheet
        chosen = read_clips(pick_clips(clips, args.clips, args.seed))
        title = (f"abvid inspect: {len(chosen)} of {stats.clips} clips, {len(stats.span)} videos, "
                 f"{stats.shards} shards ({', '.join(args.shards)[:80]})")
        try:
            sheet = draw_sheet(chosen, title=title, sampler=sampler, seed=args.seed, thumb_h=args.thumb,
                               max_frames=args.frames)
        except ValueError as e:
            print(f"abvid inspect: {e}", file=sys.stderr)
            return EXIT_FAILED
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out)
        print(f"contact sheet: {out} ({sheet.width}x{sheet.height})")
    return EXIT_OK
