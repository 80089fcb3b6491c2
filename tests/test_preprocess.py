"""abvid preprocess end to end: frames vs a reference decode, broken inputs, isolation, resume, slices.

Runs the library in-process (``run_preprocess``) or the CLI (``abvid.tools.cli.main`` /
a subprocess for SIGKILL). Videos are tiny (96x64) so the whole file runs in seconds.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_video
from _faults import make_audio_only, truncate

from abvid.pipeline.preprocess import PreprocessConfig, run_preprocess, video_id
from abvid.tools.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(size=48, clip_len=4, workers=2)


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over all completed shards; asserts no key appears twice."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        seen_here = set()
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                assert key not in samples or key in seen_here, f"key {key} in two shards"
                seen_here.add(key)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def manifest(out: Path, name: str = "manifest.jsonl") -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
    return {r["path"]: r for r in rows}


def decode_img(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def reference_selection(path: Path, fps: float, size: tuple[int, int]):
    """Independent reference: PyAV decodes every frame, slot k takes the frame with pts nearest t0 + k/fps."""
    import av
    with av.open(str(path)) as c:
        frames = sorted((float(f.pts * f.time_base), f.to_ndarray(format="rgb24", width=size[0], height=size[1]))
                        for f in c.decode(video=0))
    pts = np.array([p for p, _ in frames])
    chosen, k = [], 0
    while pts[0] + k / fps <= pts[-1] + 1e-9:
        chosen.append(int(np.argmin(np.abs(pts - (pts[0] + k / fps)))))  # argmin: first (earlier) on a tie
        k += 1
    return pts, [img for _, img in frames], chosen


VFR_PTS = list(np.cumsum(np.random.default_rng(3).uniform(0.01, 0.2, 40)).round(3) - 0.0)


@pytest.mark.parametrize("src", ["30", "25", "12.5", "vfr"])
def test_frames_equal_iter_frames_and_reference_decode(tmp_path, src):
    from abvid.pipeline.video import iter_frames
    path = tmp_path / f"v{src}.mp4"
    if src == "vfr":
        make_video(path, pts_s=[0.0] + VFR_PTS, width=96, height=64)
    else:
        make_video(path, fps=float(src), num_frames=int(float(src) * 3), width=96, height=64)
    cfg = PreprocessConfig(fps=4.0, format="webp", quality=100, **SMALL)  # lossless: exact pixel equality
    stats = run_preprocess([str(path)], tmp_path / "out", cfg, progress=False)
    assert stats.ok == 1 and stats.failed == 0
    samples = read_shards(tmp_path / "out")
    expect = list(iter_frames(path, fps=4.0, short_side=48))
    assert len(samples) == len(expect) // 4 >= 2
    assert stats.tail_frames == len(expect) % 4
    pts, ref_imgs, chosen = reference_selection(path, 4.0, (72, 48))
    assert len(chosen) == len(expect)
    vid = video_id(str(path))
    for c in range(len(samples)):
        s = samples[f"{vid}-{c:06d}"]
        meta = json.loads(s["json"])
        assert meta["frame_indices"] == list(range(4 * c, 4 * c + 4))
        assert (meta["width"], meta["height"], meta["fps"], meta["clip_index"]) == (72, 48, 4.0, c)
        for i in range(4):
            k = 4 * c + i
            img = decode_img(s[f"{i:03d}.webp"])
            np.testing.assert_array_equal(img, expect[k].image)         # exactly what the decoder gave
            assert abs(meta["pts_s"][i] - expect[k].pts_s) < 1e-6
            j = chosen[k]                                                # reference pts-based selection
            assert abs(meta["pts_s"][i] - pts[j]) < 1e-6
            local = np.diff(pts[max(j - 1, 0):j + 2]).max()
            assert abs(meta["pts_s"][i] - (pts[0] + k / 4.0)) <= local / 2 + 1e-6
            diffs = [np.abs(img.astype(int) - r.astype(int)).mean() for r in ref_imgs]
            assert int(np.argmin(diffs)) == j and diffs[j] < 4.0, "pixels are not the reference frame's"


@pytest.fixture
def corpus(tmp_path) -> dict[str, Path]:
    v = tmp_path / "in"
    paths = {f"good{i}": make_video(v / f"good{i}.mp4", fps=10, num_frames=30, width=96, height=64, seed=i)
             for i in range(3)}
    return paths


def test_broken_inputs_fail_alone_with_reasons_and_resume(tmp_path, corpus):
    v = tmp_path / "in"
    bad = {"truncated": truncate(corpus["good0"], v / "truncated.mp4"),
           "zero": v / "zero.mp4", "text": v / "text.mp4", "audio": make_audio_only(v / "audio.mp4"),
           "missing": v / "missing.mp4",
           "hang": make_video(v / "hang.mp4", fps=10, num_frames=30, width=96, height=64, seed=7),
           "crash": make_video(v / "crash.mp4", fps=10, num_frames=30, width=96, height=64, seed=8)}
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("this is not a video\n" * 10)
    Path(str(bad["hang"]) + ".hang").touch()
    Path(str(bad["crash"]) + ".crash").touch()
    Path(str(corpus["good1"]) + ".calls").touch()
    (tmp_path / "list.txt").write_text("\n".join(str(p) for p in [*corpus.values(), *bad.values()]) + "\n")
    cfg = PreprocessConfig(fps=4.0, timeout_s=4.0, decode_hook="_faults:hook", **SMALL)
    out = tmp_path / "out"
    stats = run_preprocess([str(tmp_path / "list.txt")], out, cfg, progress=False)
    rows = manifest(out)
    assert len(rows) == 10 and stats.ok == 3 and stats.failed == 7
    for p in corpus.values():
        assert rows[str(p)]["status"] == "ok" and rows[str(p)]["clips"] == 3   # 2.9 s at 4 fps: 12 frames
    reasons = {k: rows[str(p)]["error"] for k, p in bad.items()}
    assert all(rows[str(p)]["status"] == "failed" for p in bad.values())
    assert "timed out after 4 s" in reasons["hang"]
    assert "crashed (signal SIGSEGV)" in reasons["crash"]
    assert "no such file" in reasons["missing"] and "empty file" in reasons["zero"]
    assert "no video stream" in reasons["audio"]
    for k in ("truncated", "text"):
        assert str(bad[k]) in reasons[k] and len(reasons[k]) > len(str(bad[k])) + 10
    assert stats.failures_by_reason["timeout"] == 1 and stats.failures_by_reason["crash"] == 1
    keys = set(read_shards(out))
    assert keys == {f"{video_id(str(p))}-{c:06d}" for p in corpus.values() for c in range(3)}
    assert not list(out.glob("*.tmp")) and not list(out.glob(".spool-*"))

    # Rerun: ok videos are not decoded again and failures stay failed without --retry-failed.
    os.unlink(str(bad["crash"]) + ".crash")
    os.unlink(str(bad["hang"]) + ".hang")
    stats2 = run_preprocess([str(tmp_path / "list.txt")], out, cfg, progress=False)
    assert (stats2.resumed, stats2.failed, stats2.shards) == (3, 7, [])
    assert Path(str(corpus["good1"]) + ".calls").read_text().count("decoded") == 1
    # --retry-failed decodes the failures again: the fixed ones are now ok, in new shards.
    stats3 = run_preprocess([str(tmp_path / "list.txt")], out,
                            PreprocessConfig(**{**cfg.__dict__, "retry_failed": True}), progress=False)
    rows = manifest(out)
    assert stats3.ok == 5 and stats3.failed == 5 and len(rows) == 10
    assert rows[str(bad["crash"])]["status"] == rows[str(bad["hang"])]["status"] == "ok"
    assert Path(str(corpus["good1"]) + ".calls").read_text().count("decoded") == 1
    assert len(read_shards(out)) == 15


def test_annotations_joined_and_reruns_write_identical_shards(tmp_path, corpus):
    ann = tmp_path / "ann.csv"
    ann.write_text("video,start_s,end_s,label\ngood0.mp4,0.0,0.9,early\ngood0,1.5,9,late\ngood1,0,9,all\n")
    cfg = PreprocessConfig(fps=4.0, annotations=str(ann), **SMALL)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run_preprocess([str(tmp_path / "in")], out, cfg, progress=False).ok == 3
    a, b = read_shards(outs[0]), read_shards(outs[1])
    assert a == b and len(a) == 9
    for shard in outs[0].glob("*.tar"):   # deterministic layout too: the files are byte-identical
        assert shard.read_bytes() == (outs[1] / shard.name).read_bytes()
    g0 = video_id(str(corpus["good0"]))
    labels = [[x["label"] for x in json.loads(a[f"{g0}-{c:06d}"]["json"])["annotations"]] for c in range(3)]
    assert labels == [["early"], ["late"], ["late"]]   # clip 0 spans [0, 1.0) s, clip 1 [1.0, 2.0) s, ...
    assert [x["label"] for x in json.loads(a[f"{video_id(str(corpus['good1']))}-000001"]["json"])["annotations"]] \
        == ["all"]
    assert json.loads(a[f"{video_id(str(corpus['good2']))}-000000"]["json"])["annotations"] == []
    import webdataset as wds
    urls = sorted(str(p) for p in outs[0].glob("*.tar"))
    got = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(got) == sorted(a) and len(set(got)) == len(got)


def test_clip_stride_overlap_and_gaps(tmp_path, corpus):
    for stride, starts in ((2, [0, 2, 4, 6, 8]), (6, [0, 6])):
        out = tmp_path / f"s{stride}"
        run_preprocess([str(corpus["good0"])], out, PreprocessConfig(fps=4.0, clip_stride=stride, **SMALL),
                       progress=False)
        s = read_shards(out)
        got = [json.loads(s[k]["json"])["frame_indices"] for k in sorted(s)]
        assert got == [list(range(a, a + 4)) for a in starts]
    # the default JPEG path carries the decoder's frames within JPEG error (q90)
    from abvid.pipeline.video import iter_frames
    expect = [f.image.astype(int) for f in iter_frames(corpus["good0"], fps=4.0, short_side=48)]
    errs = [np.abs(decode_img(s[k][f"{i:03d}.jpg"]).astype(int) - expect[json.loads(s[k]["json"])["frame_indices"][i]])
            .mean() for k in s for i in range(4)]
    print(f"JPEG q90 mean abs error: max {max(errs):.2f}")
    assert max(errs) < 3.0


def test_frames_in_stride_gaps_are_not_encoded(tmp_path, corpus, monkeypatch):
    """clip_stride > clip_len: only the frames of clips (and at most a short tail) reach the encoder."""
    import abvid.pipeline.clips as P
    calls = []
    real = P.encode_image
    monkeypatch.setattr(P, "encode_image", lambda img, fmt, quality: calls.append(1) or real(img, fmt, quality))
    cfg = PreprocessConfig(fps=4.0, clip_stride=6, **SMALL)                 # 12 slots: clips at 0-3 and 6-9
    row = P.process_video({"path": str(corpus["good0"]), "video_id": "v", "spool": str(tmp_path / "s.spool"),
                           "annotations": []}, cfg, threads=1)
    assert row["status"] == "ok" and row["clips"] == 2 and row["frames"] == 12
    assert len(calls) == 8                                                   # slots 0-3, 6-9; not 4, 5, 10, 11


def test_cli_exit_codes(tmp_path, corpus, capsys):
    out = str(tmp_path / "out")
    ok = str(corpus["good0"])
    small = ["--size", "48", "--clip-len", "4", "--no-progress"]
    assert cli_main(["preprocess", ok, "--out", out, *small]) == 0
    (tmp_path / "list.txt").write_text(f"{ok}\n{tmp_path / 'nope.mp4'}\n")   # a missing entry of a list: exit 1
    assert cli_main(["preprocess", str(tmp_path / "list.txt"), "--out", out, *small]) == 1
    assert "no such file" in manifest(Path(out))[str(tmp_path / "nope.mp4")]["error"]
    with pytest.raises(SystemExit) as e:
        cli_main(["preprocess", ok, "--out", out, "--bogus"])
    assert e.value.code == 2
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("video,start_s,end_s,label\nx,1,0,cat\n")
    (tmp_path / "list.csv").write_text("file\nx.mp4\n")
    capsys.readouterr()
    for argv, msg in [([str(tmp_path / "empty")], "nothing to do"),
                      ([ok, "--annotations", str(tmp_path / "bad.csv")], "bad.csv:2"),
                      ([str(tmp_path / "list.csv")], "list.csv:1"),
                      ([ok, "--slice", "5/2"], "--slice"),
                      ([ok, "--size", "32"], "other settings")]:   # resume with other settings
        assert cli_main(["preprocess", *argv, "--out", out, "--clip-len", "4", "--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_missing_input_or_out_a_file_is_a_usage_error_and_creates_nothing(tmp_path, corpus, capsys):
    nope = tmp_path / "nope.mp4"
    for inputs in ([str(nope)], [str(corpus["good0"]), str(nope)]):
        assert cli_main(["preprocess", *inputs, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(nope) in err and "no such file" in err and "Traceback" not in err
        assert not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    assert cli_main(["preprocess", str(corpus["good0"]), "--out", str(tmp_path / "file"), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_too_short_videos_are_skipped_and_nothing_usable_exits_3(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    args = ["preprocess", str(corpus["good0"]), str(corpus["good1"]), "--out", str(out), "--size", "48",
            "--no-progress"]                     # 3 s at 4 fps: 12 frames < the default clip of 16
    assert cli_main(args) == 3
    cap = capsys.readouterr()
    assert "nothing usable" in cap.err and "shorter than one clip of 16" in cap.err and "--clip-len" in cap.err
    assert "skipped: too short" in cap.out
    rows = manifest(out)
    assert {r["status"] for r in rows.values()} == {"skipped"} and {r["reason"] for r in rows.values()} == {"too short"}
    assert all("12 frames" in r["error"] for r in rows.values())
    assert cli_main(args) == 3                   # still nothing, and the short videos are not decoded again
    assert json.loads((out / "stats.json").read_text())["by_node"] == {} and "nothing usable" in capsys.readouterr().err
    # with usable clips from an earlier run, a too-short newcomer does not make the run fail
    out2 = tmp_path / "out2"
    base = ["--out", str(out2), "--size", "48", "--clip-len", "12", "--no-progress"]
    assert cli_main(["preprocess", str(corpus["good0"]), *base]) == 0
    short = make_video(tmp_path / "in2" / "short.mp4", fps=10, num_frames=10, width=96, height=64)
    assert cli_main(["preprocess", str(corpus["good0"]), str(short), *base]) == 0
    assert manifest(out2)[str(short)]["status"] == "skipped"
    assert cli_main(["preprocess", str(corpus["good0"]), str(short), *base]) == 0   # everything done: exit 0
    capsys.readouterr()


def test_second_run_on_the_same_output_is_refused_while_one_runs(tmp_path, corpus, capsys):
    import fcntl
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".shard.lock", "a+") as held:   # what a running preprocess holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli_main(["preprocess", str(corpus["good0"]), "--out", str(out), "--no-progress"]) == 3
    assert "another preprocess run" in capsys.readouterr().err
    # another slice (prefix) of the same folder is not blocked
    assert cli_main(["preprocess", str(corpus["good0"]), "--out", str(out), "--prefix", "other", "--size", "48",
                     "--clip-len", "4", "--no-progress"]) == 0


def test_slices_cover_every_input_once(tmp_path, corpus):
    for i in range(3):
        make_video(tmp_path / "in" / f"more{i}.mp4", fps=10, num_frames=20, width=96, height=64, seed=10 + i)
    out = tmp_path / "out"
    for i in range(3):
        assert cli_main(["preprocess", str(tmp_path / "in"), "--out", str(out), "--slice", f"{i}/3", "--size", "48",
                         "--clip-len", "4", "--workers", "1", "--no-progress"]) == 0
    paths = [p for i in range(3) for p in manifest(out, f"shard-{i}-of-3-manifest.jsonl")]
    assert sorted(paths) == sorted(str(p) for p in (tmp_path / "in").glob("*.mp4"))
    keys = read_shards(out)   # asserts no key in two shards
    assert {k.rsplit("-", 1)[0] for k in keys} == {video_id(p) for p in paths}
    assert all(p.name.startswith("shard-") and "-of-3-" in p.name for p in out.glob("*.tar"))


def _cli(out: Path, inputs: list[str]) -> list[str]:
    return [sys.executable, "-m", "abvid.tools.cli", "preprocess", *inputs, "--out", str(out), "--size", "48",
            "--clip-len", "2", "--shard-clips", "2", "--workers", "2", "--no-progress"]


def _frame_digests(out: Path) -> dict[str, str]:
    return {f"{k}.{ext}": hashlib.sha1(v).hexdigest() for k, s in read_shards(out).items() for ext, v in s.items()}


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_matches_clean_run(tmp_path):
    vids = [str(make_video(tmp_path / "in" / f"k{i}.mp4", fps=10, num_frames=40 + 5 * i, width=96, height=64,
                           seed=i)) for i in range(8)]
    clean = tmp_path / "clean"
    t0 = time.monotonic()
    subprocess.run(_cli(clean, vids), check=True, capture_output=True, cwd=ROOT)
    clean_s = time.monotonic() - t0
    expect = _frame_digests(clean)
    out = tmp_path / "killed"
    rng = random.Random(0)
    progress = []
    for attempt in range(3):   # kill after the 1st new shard appears, after the 2nd, then at a random moment
        before = set(out.glob("*.tar"))
        p = subprocess.Popen(_cli(out, vids), cwd=ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        if attempt < 2:
            while len(set(out.glob("*.tar")) - before) <= attempt and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
        else:
            time.sleep(rng.uniform(0.05, clean_s / 2))
        finished = p.poll() is not None
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:   # the run (and its workers) had already ended
            pass
        p.wait()
        rows = manifest(out) if (out / "manifest.jsonl").exists() else {}
        for row in rows.values():
            if row["status"] == "ok":   # invariant: an ok row's clips are in completed shards
                assert all((out / s).exists() for s in row["shards"])
        read_shards(out)   # no key twice among completed shards, at any moment
        progress.append((attempt, finished, len(list(out.glob("*.tar"))),
                         sum(r["status"] == "ok" for r in rows.values())))
    print("kills (attempt, had finished, shards, ok rows):", progress)
    assert not progress[0][1] and 1 <= progress[0][2] and progress[0][3] < 8, "first kill was not mid-run"
    assert not progress[1][1] and progress[1][3] < 8, "second kill was not mid-run"
    r = subprocess.run(_cli(out, vids), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert _frame_digests(out) == expect
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.commit"))
    assert {r["status"] for r in manifest(out).values()} == {"ok"} and len(manifest(out)) == 8


@pytest.mark.slow
def test_memory_flat_in_video_length(tmp_path):
    peaks = {}
    for minutes in (1, 10):
        path = make_video(tmp_path / f"m{minutes}.mp4", fps=10, num_frames=600 * minutes, width=96, height=64)
        out = tmp_path / f"out{minutes}"
        subprocess.run([sys.executable, "-m", "abvid.tools.cli", "preprocess", str(path), "--out", str(out),
                        "--size", "64", "--workers", "1", "--no-progress"], check=True, capture_output=True, cwd=ROOT)
        stats = json.loads((out / "stats.json").read_text())
        assert stats["frames"] == 240 * minutes
        peaks[minutes] = stats["peak_rss_mb"]
    print(f"peak RSS MB (worker / parent): 1 min {peaks[1]}, 10 min {peaks[10]}")
    for who in ("worker", "parent"):
        assert peaks[10][who] < 1.5 * peaks[1][who], peaks


@pytest.mark.slow
def test_every_shared_media_file_ends_ok_or_failed_with_reason(tmp_path, shared_media):
    from abvid.pipeline.inputs import expand_inputs
    out = tmp_path / "out"
    cfg = PreprocessConfig(fps=1.0, size=64, clip_len=2, workers=2, timeout_s=120)
    stats = run_preprocess([str(shared_media)], out, cfg, progress=False)
    rows = manifest(out)
    expected = [it.path for it in expand_inputs([str(shared_media)])]
    assert sorted(rows) == sorted(expected) and stats.inputs == len(expected) > 40
    for path, row in rows.items():
        assert row["status"] in ("ok", "failed", "skipped"), row
        if row["status"] != "ok":
            assert path in row["error"] and row["error"], row
        if row["status"] == "skipped":   # a clip under 2 s: fewer frames at 1 fps than one clip of 2
            assert row["reason"] == "too short" and row["frames"] < 2, row
    print({p.split("videos/")[-1]: r["error"] for p, r in rows.items() if r["status"] != "ok"})
    assert stats.ok + stats.skipped >= len(expected) - 3 and stats.ok > 30
    assert len(read_shards(out)) == stats.clips
