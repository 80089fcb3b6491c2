"""`make demo`'s pipeline end to end on a tiny budget: both toy corpora -> preprocess -> pretrain
(random, base, AB) -> embed the probe corpus -> probe, through examples/demo.sh, examples/ablation.sh,
`abvid ablate` and the real CLI."""
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
