"""Tests of train/probe.py and `abvid probe`: by-video split, linear / k-NN probes, label joining."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from abvid.train.probe import (ProbeError, average_precision, frame_labels, knn_probe, linear_probe, run_probe,
                               split_by_video)
from abvid.pipeline.annotations import load_annotations


def write_embedding_dir(out: Path, *, videos: int = 12, frames: int = 10, dim: int = 16, classes: int = 3,
                        separable: bool = True, seed: int = 0, multilabel: bool = False) -> Path:
    """An `abvid embed`-style folder whose video v carries label c{v % classes} over its whole length."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 4.0
    x, rows, segs = [], [], []
    for v in range(videos):
        c = v % classes
        for f in range(frames):
            feat = rng.normal(size=dim)
            if separable:
                feat += centers[c] + (centers[(c + 1) % classes] if multilabel and f >= frames // 2 else 0)
            x.append(feat)
            rows.append({"row": len(rows), "video_id": f"v{v:02d}_0123abcd", "source": f"/data/v{v:02d}.mp4",
                         "frame_index": f, "pts_s": f * 0.25})
        segs.append((f"v{v:02d}.mp4", 0.0, frames * 0.25, f"c{c}"))
        if multilabel:  # the second half of each video also shows the next class
            segs.append((f"v{v:02d}.mp4", frames * 0.125, frames * 0.25, f"c{(c + 1) % classes}"))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", np.asarray(x, dtype=np.float32))
    with (out / "index.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["row", "video_id", "source", "frame_index", "pts_s"])
        w.writeheader()
        w.writerows(rows)
    with (out / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "start_s", "end_s", "label"])
        w.writerows(segs)
    return out


def test_split_never_puts_a_video_on_both_sides():
    vids = [f"v{i % 17}" for i in range(500)]
    for seed in range(5):
        test = split_by_video(vids, 0.3, seed)
        train_v = {v for v, t in zip(vids, test) if not t}
        test_v = {v for v, t in zip(vids, test) if t}
        assert train_v and test_v and not (train_v & test_v)
        assert train_v | test_v == set(vids)
    assert (split_by_video(vids, 0.3, 1) == split_by_video(vids, 0.3, 1)).all()
    with pytest.raises(ProbeError, match="at least 2"):
        split_by_video(["a"] * 5, 0.5, 0)


def test_frame_labels_by_pts_and_video_name(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("video,start_s,end_s,label\n/x/a.mp4,0,1,cat\na.mp4,0.5,2,dog\nb,0,9,cow\nc_0123abcd,0,1,hen\n")
    rows = [{"video_id": "a_12345678", "source": "/x/a.mp4", "pts_s": t} for t in ("0.25", "0.75", "1.5", "3")]
    rows.append({"video_id": "b_12345678", "source": "/y/b.mkv", "pts_s": "4"})
    rows.append({"video_id": "c_0123abcd", "source": "/z/c.mp4", "pts_s": "0"})  # found by video_id
    assert frame_labels(rows, load_annotations(p)) == [["cat"], ["cat", "dog"], ["dog"], [], ["cow"], ["hen"]]


def test_linear_and_knn_separate_separable_features(tmp_path):
    d = write_embedding_dir(tmp_path / "emb")
    results = run_probe(d, d / "labels.csv", methods=("linear", "knn"), test_fraction=0.34, seed=0)
    for r in results:
        assert r.metric == "accuracy" and r.classes == 3
        assert r.score > 0.97, r
    saved = json.loads((d / "probe.json").read_text())
    assert [r["method"] for r in saved["results"]] == ["linear", "knn"]
    assert saved["results"][0]["train_videos"] + saved["results"][0]["test_videos"] == 12


def test_shuffled_labels_fall_to_chance(tmp_path):
    d = write_embedding_dir(tmp_path / "emb", videos=30, frames=20, classes=3)
    scores = {m: [] for m in ("linear", "knn")}
    for seed in range(3):
        for r in run_probe(d, d / "labels.csv", test_fraction=0.3, seed=seed, shuffle_labels=True):
            scores[r.method].append(r.score)
    for m, s in scores.items():  # chance = 1/3; separable features would give ~1.0
        assert 0.15 < np.mean(s) < 0.52, (m, s)


def test_multilabel_uses_map(tmp_path):
    d = write_embedding_dir(tmp_path / "emb", multilabel=True)
    for r in run_probe(d, d / "labels.csv", test_fraction=0.34):
        assert r.task == "multi-label" and r.metric == "mAP"
        assert r.score > 0.9, r
        assert r.chance < 0.8


def test_average_precision_reference():
    s = np.array([0.9, 0.8, 0.7, 0.6])
    assert average_precision(s, np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(s, np.array([1, 1, 0, 0])) == 1.0


def test_knn_votes_and_linear_probe_shapes():
    x = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    y = torch.tensor([0, 0, 1, 1])
    s = knn_probe(x, y, torch.tensor([[1.0, 0.05], [0.0, 1.0]]), multilabel=False, k=2)
    assert s.shape == (2, 2) and s.argmax(1).tolist() == [0, 1]
    assert torch.allclose(s.sum(1), torch.ones(2))
    p = linear_probe(x, y, x, multilabel=False)
    assert p.argmax(1).tolist() == [0, 0, 1, 1]


def test_cli_probe_table_and_errors(tmp_path, capsys):
    from abvid.tools.cli import main
    d = write_embedding_dir(tmp_path / "emb")
    assert main(["probe", "--embeddings", str(d), "--labels", str(d / "labels.csv"), "--method", "knn"]) == 0
    out = capsys.readouterr().out
    assert "knn" in out and "accuracy" in out
    assert main(["probe", "--embeddings", str(tmp_path / "nope"), "--labels", str(d / "labels.csv")]) == 2
    assert "abvid embed" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text("video,start_s,end_s,label\nzzz.mp4,0,1,a\n")
    assert main(["probe", "--embeddings", str(d), "--labels", str(tmp_path / "other.csv")]) == 2
    assert "video" in capsys.readouterr().err


def write_video_labels(d: Path, labels: dict[int, str]) -> Path:
    """The whole-video shorthand: video,label (one row per video)."""
    p = d / "video_labels.csv"
    p.write_text("video,label\n" + "".join(f"v{v:02d}.mp4,{lab}\n" for v, lab in labels.items()))
    return p


def test_whole_video_label_shorthand_equals_segments_covering_each_video(tmp_path):
    d = write_embedding_dir(tmp_path / "emb")
    short = write_video_labels(d, {v: f"c{v % 3}" for v in range(12)})
    a = run_probe(d, d / "labels.csv", methods=("knn",), test_fraction=0.34, seed=1)
    b = run_probe(d, short, methods=("knn",), test_fraction=0.34, seed=1)
    assert a == b and a[0].score > 0.97
    (d / "vl.jsonl").write_text("".join(json.dumps({"video": f"v{v:02d}", "label": f"c{v % 3}"}) + "\n"
                                        for v in range(12)))
    assert run_probe(d, d / "vl.jsonl", methods=("knn",), test_fraction=0.34, seed=1) == a
    (d / "bad.csv").write_text("video,label\nv00.mp4,\n")
    with pytest.raises(ProbeError, match=r"bad.csv:2: .*non-empty 'video' and 'label'"):
        run_probe(d, d / "bad.csv")


def test_split_is_stratified_by_main_label():
    vids = [f"v{i}" for i in range(12) for _ in range(3)]
    strata = {f"v{i}": ("rare" if i < 2 else "common") for i in range(12)}
    for seed in range(6):
        test = split_by_video(vids, 0.3, seed, strata)
        test_v = {v for v, t in zip(vids, test) if t}
        assert len(test_v & {"v0", "v1"}) == 1               # the rare class is on both sides, every time
        assert len(test_v) == 1 + round(0.3 * 10)
    with pytest.raises(ProbeError, match="one video only"):
        split_by_video(["a", "b"], 0.5, 0, {"a": "x", "b": "y"})


def test_test_classes_absent_from_training_warn_and_refuse(tmp_path, capsys):
    from abvid.train.probe import ProbeWarning, _unseen_test_classes, main_labels
    d = write_embedding_dir(tmp_path / "emb", videos=12, classes=3)
    # one label per video: every class has one video, so no by-video split can test a trained class
    with pytest.raises(ProbeError, match="one video only"):
        run_probe(d, write_video_labels(d, {v: f"only{v}" for v in range(12)}))
    # a second label carried by one test video only: warned, named, left out of the mAP
    vids = [f"v{v:02d}_0123abcd" for v in range(12)]
    strata = main_labels(vids, [[f"c{v % 3}"] for v in range(12)])
    test = split_by_video(vids, 0.3, 0, strata)
    lonely = int(np.flatnonzero(test)[0])
    multi = d / "multi.csv"
    multi.write_text("video,label\n" + "".join(f"v{v:02d}.mp4,c{v % 3}\n" for v in range(12))
                     + f"v{lonely:02d}.mp4,extra\n")
    with pytest.warns(ProbeWarning, match=r"1 test class.*left out of the score: extra"):
        res = run_probe(d, multi, methods=("knn",), test_fraction=0.3, seed=0)
    assert res[0].metric == "mAP" and res[0].score > 0.9
    assert json.loads((d / "probe.json").read_text())["unseen_test_classes"] == ["extra"]
    from abvid.tools.cli import main
    assert main(["probe", "--embeddings", str(d), "--labels", str(multi), "--method", "knn",
                 "--test-fraction", "0.3"]) == 0
    assert "abvid probe: warning: 1 test class(es) never occur in the training videos" in capsys.readouterr().err
    # the refusal itself: test classes, none of them in training
    y = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ProbeError, match="no class of the test videos occurs in the training videos"):
        _unseen_test_classes(y, torch.tensor([True, True, False, False]), torch.tensor([False, False, True, True]),
                             ["a", "b"], multilabel=False)
