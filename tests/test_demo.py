"""`make demo`'s pipeline end to end on a tiny budget: toy corpus -> preprocess -> pretrain
(random, base, AB) -> embed -> probe, through examples/demo.sh and the real CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_script_runs_end_to_end(tmp_path):
    env = dict(os.environ, VIDEOS="6", STEPS="4",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    out = tmp_path / "demo"
    r = subprocess.run(["bash", str(ROOT / "examples" / "demo.sh"), str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads((out / "demo_result.json").read_text())
    assert set(result) == {"random", "base", "ab"}
    for scores in result.values():
        assert set(scores) == {"linear", "knn"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert "probe on held-out videos" in r.stdout
    for name, steps in (("random", 0), ("base", 4), ("ab", 4)):
        ckpts = sorted((out / "runs" / name / "checkpoints").glob("*.pt"))
        assert ckpts and ckpts[-1].name == f"ckpt-{steps:08d}.pt"
    manifest = [json.loads(l) for l in (out / "shards" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 6 and all(row["status"] == "ok" for row in manifest)
    # `make demo` twice in a row: the rerun retrains (--no-resume) and must re-embed, not refuse the
    # embeddings of the first run's encoders (it did: embed stopped at "made with other settings")
    import numpy as np
    first = np.load(out / "emb" / "ab" / "embeddings.npy")
    env["STEPS"] = "5"
    r = subprocess.run(["bash", str(ROOT / "examples" / "demo.sh"), str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert sorted((out / "runs" / "ab" / "checkpoints").glob("*.pt"))[-1].name == "ckpt-00000005.pt"
    second = np.load(out / "emb" / "ab" / "embeddings.npy")
    assert second.shape == first.shape and not np.array_equal(second, first)   # the new encoder's embeddings
