"""tools/bench/train.py (``abvid bench train``): the closing JSON line carries counted FLOPs and TFLOP/s."""
from __future__ import annotations

import json

from abvid.tools.cli import main
from abvid.train.flops import vit_forward_flops


def test_bench_train_reports_flops_and_tflops(capsys, tmp_path):
    trace = tmp_path / "trace.json"
    assert main(["bench", "train", "--arch", "vit_tiny", "--patch-size", "8", "--views", "2x32,2x16",
                 "--batch", "2", "--steps", "1", "--threads", "1", "--profile", str(trace)]) == 0
    out = capsys.readouterr().out
    assert json.loads(trace.read_text())["traceEvents"] and "aten::" in out      # the trace and the op table
    row = json.loads(out.strip().splitlines()[-1])
    assert row["bench"] == "train" and row["unit"] == "ms/step" and row["ratio"] > 0
    # AB counts more than base (teacher over the locals too, value decoder), and at least the student's
    # forward + backward of a vit_tiny/8 over 4 x 32 px + 4 x 16 px views
    student = 3 * (vit_forward_flops(4, 32, 32, 8, 192, 12) + vit_forward_flops(4, 16, 16, 8, 192, 12))
    assert row["flops_per_step"] > row["base_flops_per_step"] > 0.9 * student
    assert row["tflops"] > 0 and abs(row["tflops"] - row["flops_per_step"] / row["ab_ms"] / 1e9) < 1e-3
    assert row["mfu"] is None and "CPU" in row["mfu_note"]          # no MFU without a GPU peak
