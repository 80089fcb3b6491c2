"""`make demo`'s pipeline end to end on a tiny budget: both toy corpora -> preprocess -> pretrain
(random, base, AB) -> embed the probe corpus -> probe, through examples/demo.sh, examples/ablation.sh,
`abvid ablate` and the real CLI; and the other example scripts (ablation.sh's guard, supervised_ceiling.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)       # many CLI subprocesses: pytest's 300 s default trips on a loaded machine
def test_demo_script_runs_end_to_end(tmp_path):
    env = dict(os.environ, VIDEOS="6", STEPS="4",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    out = tmp_path / "demo"
    r = subprocess.run(["bash", str(ROOT / "examples" / "demo.sh"), str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads((out / "demo_result.json").read_text())
    assert set(result) == {"shapes", "crowd"}
    for kind in result.values():
        assert set(kind) == {"random", "base", "ab"}
        for scores in kind.values():
            assert set(scores) == {"linear", "knn"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert r.stdout.count("probe on held-out videos") == 2
    for kind in ("shapes", "crowd"):
        for name, steps in (("random", 0), ("base", 4), ("ab", 4)):
            ckpts = sorted((out / kind / "runs" / name / "seed0" / "checkpoints").glob("*.pt"))
            assert ckpts and ckpts[-1].name == f"ckpt-{steps:08d}.pt"
        for part in (0, 1):                                          # pretraining corpus, probe corpus
            manifest = (out / "data" / f"{kind}-{part}" / "shards" / "manifest.jsonl").read_text().splitlines()
            assert len(manifest) == 6 and all(json.loads(row)["status"] == "ok" for row in manifest)
    # (a rerun with other settings redoes the runs: demo.sh removes them first, and `abvid ablate` refuses a
    # run folder made with other settings, tests/test_ablation.py)


def test_ablation_script_refuses_a_corpus_made_with_another_video_count(tmp_path):
    """A corpus folder made with another VIDEOS would have its shards reused under the new count's name."""
    env = dict(os.environ, VIDEOS="2", KINDS="shapes", ROWS="random", SEEDS="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    corpus = tmp_path / "data" / "shapes-0" / "corpus"
    subprocess.run([sys.executable, "-m", "abvid.tools.cli", "toy-corpus", str(corpus), "--videos", "1",
                    "--seconds", "1", "--seed", "0"], check=True, capture_output=True, cwd=ROOT, env=env)
    r = subprocess.run(["bash", str(ROOT / "examples" / "ablation.sh"), str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"{corpus} holds 1 videos, not the 2 asked for" in r.stderr
    assert not (tmp_path / "data" / "shapes-0" / "shards").exists()      # stopped before preprocessing


def _supervised_ceiling():
    import importlib.util
    spec = importlib.util.spec_from_file_location("supervised_ceiling", ROOT / "examples" / "supervised_ceiling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_supervised_ceiling_writes_an_encoder_that_embed_reads(tmp_path, capsys):
    import torch
    from conftest import write_test_shards
    from abvid.model import build_encoder, load_encoder
    shards = tmp_path / "shards"
    write_test_shards(shards, videos=2, clips_per_video=2, labels=("red", "blue"))
    sup = _supervised_ceiling()
    frames, labels = sup.labelled_frames(str(shards))
    assert len(frames) == 2 * 2 * 8 and {frozenset(s) for s in labels} == {frozenset({"red"}), frozenset({"blue"})}
    out = tmp_path / "sup.safetensors"
    assert sup.main([str(ROOT / "examples/configs/tiny_cpu.yaml"), "--shards", str(shards), "--out", str(out),
                     "--steps", "3", "--batch-size", "4", "--threads", "1"]) == 0
    assert "2 classes: blue, red" in capsys.readouterr().out
    enc = load_encoder(out)
    assert enc.embed(torch.zeros(1, 3, 48, 48)).shape == (1, 128)            # tiny_cpu.yaml's encoder
    torch.manual_seed(0)
    init = build_encoder(**enc.encoder_kwargs).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in enc.state_dict().items())   # it trained


def test_supervised_ceiling_refuses_a_folder_without_shards(tmp_path):
    sup = _supervised_ceiling()
    with pytest.raises(SystemExit, match="no .tar shards in"):
        sup.labelled_frames(str(tmp_path))
