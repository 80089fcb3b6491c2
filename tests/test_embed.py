"""Tests of train/embed.py and `abvid embed`: row/index alignment, determinism, broken inputs, resume, shards."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from abvid.model import build_encoder
from abvid.model.io import save_encoder
from abvid.pipeline.errors import JobError, UsageError
from abvid.pipeline.video import open_video
from abvid.train import embed as E
from conftest import make_video, serve_folder, write_test_shards

TINY = {"arch": "vit_tiny", "patch_size": 16, "img_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 2}
SIZE = 32


@pytest.fixture
def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder(**TINY).eval()


@pytest.fixture
def videos(tmp_path) -> list[Path]:
    return [make_video(tmp_path / "v" / "a.mp4", num_frames=45, seed=1),
            make_video(tmp_path / "v" / "b.mp4", fps=25, num_frames=40, width=96, height=128, seed=2)]


def read_index(out: Path) -> list[dict]:
    with (out / "index.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_rows_match_index_and_decoded_frames(tmp_path, encoder, videos):
    res = E.embed_inputs([str(tmp_path / "v")], tmp_path / "out", encoder, fps=4.0, size=SIZE, batch_size=4,
                         progress=False)
    assert [r.status for r in res] == ["ok", "ok"]
    x = np.load(tmp_path / "out" / "embeddings.npy")
    rows = read_index(tmp_path / "out")
    assert x.shape == (len(rows), 64) and x.dtype == np.float32
    assert [int(r["row"]) for r in rows] == list(range(len(rows)))
    start = 0
    for path in videos:
        with open_video(str(path), fps=4.0, short_side=SIZE) as dec:
            ref = [(f.index, f.pts_s, E.center_square(f.image, SIZE)) for f in dec]
        mine = rows[start:start + len(ref)]
        assert {r["source"] for r in mine} == {str(path)} and len({r["video_id"] for r in mine}) == 1
        assert [int(r["frame_index"]) for r in mine] == [i for i, _, _ in ref]
        assert [float(r["pts_s"]) for r in mine] == pytest.approx([t for _, t, _ in ref], abs=1e-9)
        with torch.inference_mode():  # row i is the embedding of frame i (within fp tolerance of a lone batch)
            direct = encoder.embed(torch.from_numpy(np.stack([im for _, _, im in ref])).permute(0, 3, 1, 2))
        np.testing.assert_allclose(x[start:start + len(ref)], direct.numpy(), rtol=1e-4, atol=1e-5)
        start += len(ref)
    assert start == len(rows)
    assert [json.loads(line)["status"] for line in (tmp_path / "out" / "report.jsonl").read_text().splitlines()] \
        == ["ok", "ok"]


def test_embedding_twice_is_identical(tmp_path, encoder, videos):
    for name in ("o1", "o2"):
        E.embed_inputs([str(p) for p in videos], tmp_path / name, encoder, size=SIZE, batch_size=3, progress=False)
    a, b = np.load(tmp_path / "o1" / "embeddings.npy"), np.load(tmp_path / "o2" / "embeddings.npy")
    assert a.tobytes() == b.tobytes()
    assert read_index(tmp_path / "o1") == read_index(tmp_path / "o2")


def test_broken_input_is_reported_and_the_rest_embedded(tmp_path, encoder, videos, capsys):
    from abvid.tools.cli import main
    (tmp_path / "v" / "broken.mp4").write_bytes(b"")
    enc_file = save_encoder(encoder, TINY, tmp_path / "enc.safetensors")
    rc = main(["embed", "--checkpoint", str(enc_file), str(tmp_path / "v"), "--out", str(tmp_path / "out"),
               "--no-progress", "--batch-size", "8"])
    assert rc == 1
    assert "broken.mp4" in capsys.readouterr().err
    report = [json.loads(line) for line in (tmp_path / "out" / "report.jsonl").read_text().splitlines()]
    status = {Path(r["input"]).name: r for r in report}
    assert status["broken.mp4"]["status"] == "failed" and "empty" in status["broken.mp4"]["error"]
    assert status["a.mp4"]["status"] == status["b.mp4"]["status"] == "ok"
    rows = read_index(tmp_path / "out")
    assert {Path(r["source"]).name for r in rows} == {"a.mp4", "b.mp4"}
    assert np.load(tmp_path / "out" / "embeddings.npy").shape[0] == len(rows)
    assert status["a.mp4"]["frames"] == 6
    assert json.loads((tmp_path / "out" / "parts" / "settings.json").read_text())["size"] == 32  # img_size


def test_failed_inputs_are_skipped_on_rerun_unless_retry_failed(tmp_path, encoder, videos, capsys):
    from abvid.tools.cli import main
    from conftest import make_video
    broken = tmp_path / "v" / "broken.mp4"
    broken.write_bytes(b"")
    enc_file = save_encoder(encoder, TINY, tmp_path / "enc.safetensors")
    args = ["embed", "--checkpoint", str(enc_file), str(tmp_path / "v"), "--out", str(tmp_path / "out"),
            "--no-progress", "--batch-size", "8"]

    def report():
        rows = [json.loads(line) for line in (tmp_path / "out" / "report.jsonl").read_text().splitlines()]
        return {Path(r["input"]).name: r for r in rows}

    assert main(args) == 1
    make_video(broken, fps=4, num_frames=8, width=48, height=40)      # the file is fixed in the meantime
    assert main(args) == 1                                              # default: not tried again
    st = report()
    assert st["broken.mp4"]["status"] == "failed" and "earlier run" in st["broken.mp4"]["error"]
    assert "--retry-failed" in st["broken.mp4"]["error"] and st["a.mp4"]["status"] == "cached"
    assert main(args + ["--retry-failed"]) == 0
    st = report()
    assert st["broken.mp4"]["status"] == "ok" and st["broken.mp4"]["frames"] == 8
    assert not list((tmp_path / "out" / "parts").glob("*.failed.json"))
    assert main(args) == 0 and report()["broken.mp4"]["status"] == "cached"
    capsys.readouterr()


def test_prefetch_passes_items_and_errors_and_stops_early():
    assert list(E.prefetch(iter(range(50)), depth=2)) == list(range(50))

    def bad():
        yield 1
        raise ValueError("decoder exploded")
    it = E.prefetch(bad(), depth=2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="exploded"):
        next(it)
    endless = E.prefetch(iter(range(10**9)), depth=2)
    assert next(endless) == 0
    endless.close()   # the producer thread stops instead of blocking on the full queue


def test_rerun_skips_done_videos_and_resumes_after_a_crash(tmp_path, encoder, videos, monkeypatch):
    inputs = [str(p) for p in videos]
    clean = tmp_path / "clean"
    E.embed_inputs(inputs, clean, encoder, size=SIZE, progress=False)

    # crash while embedding the second video: the first stays done, no half part is trusted
    out = tmp_path / "out"
    real = E.encode
    calls = {"n": 0}

    def failing(enc, pixels, device, *args):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("simulated crash")
        return real(enc, pixels, device, *args)
    monkeypatch.setattr(E, "encode", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        E.embed_inputs(inputs, out, encoder, size=SIZE, batch_size=3, progress=False)
    assert not (out / "embeddings.npy").exists() and not list((out / "parts").glob("*.tmp"))
    assert len(list((out / "parts").glob("*.done.json"))) == 1
    monkeypatch.setattr(E, "encode", real)

    import abvid.train.embed_sources as S
    decoded: list[str] = []
    real_frames = S.video_frames
    monkeypatch.setattr(S, "video_frames", lambda path, *a, **k: (decoded.append(path), real_frames(path, *a, **k))[1])
    res = E.embed_inputs(inputs, out, encoder, size=SIZE, progress=False)
    assert [r.status for r in res] == ["cached", "ok"] and decoded == [inputs[1]]
    assert (out / "embeddings.npy").read_bytes() == (clean / "embeddings.npy").read_bytes()
    assert read_index(out) == read_index(clean)
    decoded.clear()
    res = E.embed_inputs(inputs, out, encoder, size=SIZE, progress=False)
    assert [r.status for r in res] == ["cached", "cached"] and decoded == []


def test_other_settings_in_the_same_folder_are_refused(tmp_path, encoder, videos):
    E.embed_inputs([str(videos[0])], tmp_path / "out", encoder, size=SIZE, progress=False)
    with pytest.raises(E.EmbedError, match="--overwrite"):
        E.embed_inputs([str(videos[0])], tmp_path / "out", encoder, size=48, progress=False)
    res = E.embed_inputs([str(videos[0])], tmp_path / "out", encoder, size=48, overwrite=True, progress=False)
    assert res[0].status == "ok"


def test_two_runs_cannot_share_an_output_folder(tmp_path, encoder, videos):
    import fcntl
    (tmp_path / "out" / "parts").mkdir(parents=True)
    with open(tmp_path / "out" / "parts" / ".lock", "a+") as held:   # as if another run were writing
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(JobError, match="another `abvid embed` run"):   # exit 3: the folder is in use
            E.embed_inputs([str(videos[0])], tmp_path / "out", encoder, size=SIZE, progress=False)
    assert E.embed_inputs([str(videos[0])], tmp_path / "out", encoder, size=SIZE, progress=False)[0].status == "ok"


def test_shards_float16_and_duplicates(tmp_path, encoder):
    shards = write_test_shards(tmp_path / "shards", videos=2, clips_per_video=2, clip_len=4, shard_clips=3)
    res = E.embed_inputs([str(tmp_path / "shards"), str(shards[0])], tmp_path / "out", encoder, size=SIZE,
                         dtype="float16", progress=False)
    assert [r.status for r in res] == ["ok", "ok", "skipped"]
    x = np.load(tmp_path / "out" / "embeddings.npy")
    rows = read_index(tmp_path / "out")
    assert x.dtype == np.float16 and x.shape == (16, 64)
    assert [(r["video_id"], int(r["frame_index"])) for r in rows] == \
        [(f"vid{v:03d}_deadbeef", i) for v in range(2) for i in range(8)]
    assert [float(r["pts_s"]) for r in rows[:8]] == [i / 4.0 for i in range(8)]
    assert rows[0]["source"] == "/data/vid000.mp4"


def test_http_shards_embed_as_their_local_files_and_a_missing_one_fails_alone(tmp_path, encoder):
    write_test_shards(tmp_path / "shards", videos=2, clips_per_video=2, clip_len=4, shard_clips=3)
    E.embed_inputs([str(tmp_path / "shards")], tmp_path / "local", encoder, size=SIZE, progress=False)
    with serve_folder(tmp_path / "shards") as (base, handler):
        handler.cut_first = 1                     # the first body drops halfway: resumed, not re-embedded short
        spec = f"{base}/shard-{{000000..000001}}.tar"
        res = E.embed_inputs([spec, f"{base}/shard-000009.tar"], tmp_path / "url", encoder, size=SIZE,
                             progress=False)
        assert [r.status for r in res] == ["ok", "ok", "failed"] and "HTTP 404" in res[2].error
        assert res[0].input == f"{base}/shard-000000.tar"
        again = E.embed_inputs([spec], tmp_path / "url", encoder, size=SIZE, progress=False)
    assert [r.status for r in again] == ["cached", "cached"]
    assert np.array_equal(np.load(tmp_path / "url" / "embeddings.npy"), np.load(tmp_path / "local" / "embeddings.npy"))
    assert read_index(tmp_path / "url") == read_index(tmp_path / "local")


def test_truncated_shard_fails_alone(tmp_path, encoder):
    shards = write_test_shards(tmp_path / "shards", videos=2, clips_per_video=2, clip_len=4, shard_clips=2)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 3])
    res = E.embed_inputs([str(tmp_path / "shards")], tmp_path / "out", encoder, size=SIZE, progress=False)
    assert [r.status for r in res] == ["ok", "failed"]
    assert "shard-000001.tar" in res[1].error
    assert len(read_index(tmp_path / "out")) == 8


def test_shard_cut_at_a_header_is_detected(tmp_path, encoder):
    import tarfile
    shards = write_test_shards(tmp_path / "shards", videos=1, clips_per_video=2, clip_len=4, shard_clips=2)
    with tarfile.open(shards[0]) as tf:
        last_header = tf.getmembers()[-1].offset
    shards[0].write_bytes(shards[0].read_bytes()[:last_header])   # tarfile alone would end quietly here
    res = E.embed_inputs([str(shards[0]), str(tmp_path / "missing.tar")], tmp_path / "out", encoder, size=SIZE,
                         progress=False)
    assert [r.status for r in res] == ["failed", "failed"]
    assert "ends inside a header" in res[0].error and "no such shard" in res[1].error
    assert not (tmp_path / "out" / "embeddings.npy").exists()


def test_parquet_is_always_written_and_readable_by_pandas_and_duckdb(tmp_path, encoder, videos):
    import pyarrow.parquet as pq   # a dependency of abvid: never skipped
    E.embed_inputs([str(videos[0])], tmp_path / "out", encoder, size=SIZE, progress=False)
    path = tmp_path / "out" / "embeddings.parquet"
    t = pq.read_table(path)
    x = np.load(tmp_path / "out" / "embeddings.npy")
    assert t.num_rows == x.shape[0]
    np.testing.assert_array_equal(np.stack(t.column("embedding").to_pylist()), x)
    pd = pytest.importorskip("pandas")   # dev extra
    df = pd.read_parquet(path)
    assert list(df.columns) == ["row", "video_id", "source", "frame_index", "pts_s", "embedding"]
    np.testing.assert_array_equal(np.stack(df["embedding"].to_numpy()), x)
    assert df["frame_index"].tolist() == [int(r["frame_index"]) for r in read_index(tmp_path / "out")]
    duckdb = pytest.importorskip("duckdb")   # dev extra
    n, first = duckdb.sql(f"SELECT count(*), min(row) FROM '{path}'").fetchall()[0]
    assert (n, first) == (x.shape[0], 0)


def test_workers_decode_in_processes_with_the_single_process_output(tmp_path, encoder, videos):
    """--workers N: same rows, same order, same vectors (1e-5) as one decoder, with a broken input and shards."""
    more = [make_video(tmp_path / "v" / f"c{i}.mp4", fps=12, num_frames=20 + 13 * i, width=80, height=64, seed=5 + i)
            for i in range(3)]
    (tmp_path / "v" / "broken.mp4").write_bytes(b"not a video")
    write_test_shards(tmp_path / "shards", videos=2, clips_per_video=2, clip_len=4, shard_clips=3)
    inputs = [str(tmp_path / "v"), str(tmp_path / "shards")]
    one = E.embed_inputs(inputs, tmp_path / "one", encoder, size=SIZE, batch_size=5, progress=False)
    many = E.embed_inputs(inputs, tmp_path / "many", encoder, size=SIZE, batch_size=5, workers=2, progress=False)
    assert [(r.input, r.status, r.frames) for r in many] == [(r.input, r.status, r.frames) for r in one]
    assert [r.status for r in one].count("failed") == 1 and len(one) == 8 and more
    assert read_index(tmp_path / "many") == read_index(tmp_path / "one")
    np.testing.assert_allclose(np.load(tmp_path / "many" / "embeddings.npy"), np.load(tmp_path / "one" / "embeddings.npy"),
                               rtol=0, atol=1e-5)
    again = E.embed_inputs(inputs, tmp_path / "many", encoder, size=SIZE, batch_size=5, workers=2, progress=False)
    assert [r.status for r in again] == ["cached" if r.status == "ok" else r.status for r in one]


def test_pool_normalize_and_a_faiss_index_a_user_can_query(tmp_path, encoder, videos):
    faiss = pytest.importorskip("faiss")   # the faiss extra, installed by make test
    ref = E.embed_inputs([str(videos[0])], tmp_path / "cls", encoder, size=SIZE, progress=False)
    assert ref[0].status == "ok"
    pixels = []
    with open_video(str(videos[0]), fps=4.0, short_side=SIZE) as dec:
        pixels = torch.from_numpy(np.stack([E.center_square(f.image, SIZE) for f in dec])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        tokens = encoder.forward_features(pixels)
    cls, mean = tokens[:, 0].numpy(), tokens[:, 1:].mean(1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "cls" / "embeddings.npy"), cls, atol=1e-5)
    out = tmp_path / "both"
    E.embed_inputs([str(videos[0])], out, encoder, size=SIZE, pool="cls+mean", normalize=True, faiss=True,
                   progress=False)
    x = np.load(out / "embeddings.npy")
    both = np.concatenate([cls, mean], 1)
    np.testing.assert_allclose(x, both / np.linalg.norm(both, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    index = faiss.read_index(str(out / "embeddings.faiss"))          # what a user does, as in embed_store.py
    assert (index.ntotal, index.d, index.metric_type) == (x.shape[0], 128, faiss.METRIC_INNER_PRODUCT)
    scores, rows = index.search(x[2:4], 3)
    assert rows[:, 0].tolist() == [2, 3] and np.allclose(scores[:, 0], 1.0, atol=1e-4)
    with pytest.raises(E.EmbedError, match="other settings"):         # the pool is pinned with the parts
        E.embed_inputs([str(videos[0])], out, encoder, size=SIZE, pool="mean", progress=False)
    E.embed_inputs([str(videos[0])], tmp_path / "mean", encoder, size=SIZE, pool="mean", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "mean" / "embeddings.npy"), mean, atol=1e-5)
    assert not (tmp_path / "mean" / "embeddings.faiss").exists()


def test_cli_usage_errors_exit_2_with_one_clear_line(tmp_path, encoder, videos, capsys):
    from abvid.tools.cli import main
    enc = str(save_encoder(encoder, TINY, tmp_path / "enc.safetensors"))
    (tmp_path / "file").write_text("x")
    cuda = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for extra, msg in [(["--out", str(tmp_path / "file")], "is a file"),
                       (["--out", str(tmp_path / "o"), "--device", cuda], "--device"),
                       (["--out", str(tmp_path / "o"), "--size", "50"], "not a multiple of the encoder's patch size 16"),
                       (["--out", str(tmp_path / "o"), "--ray-address", "x:1"], "--executor ray")]:
        capsys.readouterr()
        assert main(["embed", "--checkpoint", enc, str(videos[0]), *extra, "--no-progress"]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(UsageError, match="use 48 or 64"):
        E.check_size(encoder, 50)
    assert not (tmp_path / "o").exists()


def test_help_states_exit_codes_and_no_none_defaults(capsys):
    from abvid.tools.cli import main
    for cmd in ("embed", "preprocess"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "Exit codes:" in text and "(default: None)" not in text and "(default: )" not in text, cmd


def test_center_square():
    img = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    np.testing.assert_array_equal(E.center_square(img, 6), img[:, 2:8])
    assert E.center_square(img, 4).shape == (4, 4, 3)


def test_bench_embed_reports_the_closing_json_line(tmp_path, encoder, capsys):
    from abvid.tools.cli import main
    video = make_video(tmp_path / "b.mp4", num_frames=30)
    ckpt = save_encoder(encoder, TINY, tmp_path / "enc.safetensors")
    common = ["--checkpoint", str(ckpt), "--size", "32", "--fps", "0", "--batch-size", "8", "--repeat", "1",
              "--device", "cpu"]
    assert main(["bench", "embed", str(video), *common, "--copies", "2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["bench"] == "embed" and row["unit"] == "frames/s" and row["frames"] == 60 and row["videos"] == 2
    # on a CPU the decoders and the encoder share the cores: the bound is the two one after the other
    assert row["bound"] == pytest.approx(1 / (1 / row["decode_fps"] + 1 / row["model_fps"]), rel=1e-2)
    assert row["ratio"] == pytest.approx(row["throughput"] / row["bound"], rel=1e-2)
    for i in range(3):
        make_video(tmp_path / "clips" / f"c{i}.mp4", fps=10, num_frames=15, width=64, height=48, seed=i)
    assert main(["bench", "embed", str(tmp_path / "clips"), *common, "--workers", "2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["videos"], row["frames"], row["workers"]) == (3, 45, 2) and row["throughput"] > 0
