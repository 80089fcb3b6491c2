"""tools/gpu_check.sh + tools/gpu_check.py without a GPU: the dry run (CPU, tiny model) writes the table the
README takes, every row measured; a row that runs past its time limit says so instead of stalling the check."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)       # many CLI subprocesses: pytest's 300 s default trips on a loaded machine
def test_dry_run_writes_the_results_table(tmp_path):
    out = tmp_path / "results.md"
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "DRY_RUN": "1", "SKIP_TESTS": "1", "ARCHS": "vit_small",
                                                        "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("`tools/gpu_check.sh` on **cpu (dry run)**") and "commit" in lines[0]
    rows = [ln for ln in lines if ln.startswith("| cpu |")]
    assert len(rows) == 3, lines                      # ViT-S in memory; shards with CPU and with device decoding
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-1] == "completed" and float(cells[4].replace(",", "")) > 0, row
        assert cells[7] == "-"                         # no MFU on CPU
    assert any("CPU decode" in r for r in rows) and any("GPU decode" in r for r in rows)
    (embed,) = [ln for ln in lines if ln.startswith("`abvid bench embed CORPUS")]
    assert "--workers 2" in embed and "**ratio " in embed, embed
    assert lines[-1] == "pytest -m gpu: skipped (SKIP_TESTS=1)"


def test_a_row_past_its_time_limit_says_so(tmp_path):
    out = tmp_path / "results.md"
    r = subprocess.run([sys.executable, "-m", "abvid.tools.gpu_check", "--dry-run", "--out", str(out),
                        "--parts", "synthetic", "--archs", "vit_small", "--compile", "on", "--time-limit", "0.5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = [ln for ln in out.read_text().splitlines() if "ViT-S/16" in ln]
    assert "| on |" in row and row.endswith("timeout after 0.5 s (compiling?) |"), row
