"""train/ablation.py and `abvid ablate`: the run plan, the table's statistics, the table rebuilt from run folders,
and (slow) a real two-row, two-seed ablation through the CLI that a rerun skips."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from abvid.train.ablation import (ROWS, Plan, bar_pass_rate, collect, commands, format_table, pool, results_path,
                                  table, write_table)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import write_test_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_rows_pair_with_the_base_through_their_seeds():
    plan = Plan(config="c.yaml", shards="S", probe="P", labels="L.csv", out=Path("out"), overrides=("a.b=1",))
    ab, base = plan.run_overrides("ab", 3), plan.run_overrides("base", 3)
    assert ab[-2:] == base[-2:] == ["train.seed=3", "data.seed=3"]     # same init and same views as the base
    assert "objective.bootstrap=false" in base and "objective.bootstrap=true" in ab and "a.b=1" in ab
    assert "objective.action_tokens=false" in plan.run_overrides("ab_no_actions", 0)
    assert "train.steps=0" in plan.run_overrides("random", 0)
    pre, emb, probe = commands(plan, "ab", 3)
    assert pre[3:6] == ["pretrain", "c.yaml", "--out"] and pre[6].endswith("runs/ab/seed3")
    assert "P" in emb and probe[probe.index("--seed") + 1] == "0"


def test_the_student_encoder_is_probed_into_files_of_its_own():
    plan = Plan(config="c.yaml", shards="S", probe="P", labels="L.csv", out=Path("out"))     # student by default
    _, emb, probe = commands(plan, "ab", 3)
    assert emb[emb.index("--which") + 1] == "student" and emb[emb.index("--out") + 1].endswith("seed3/emb-student")
    assert probe[probe.index("--embeddings") + 1].endswith("emb-student")
    assert probe[probe.index("--out") + 1].endswith("seed3/probe-student.json")
    _, emb_ema, probe_ema = commands(Plan(config="c.yaml", shards="S", probe="P", labels="L.csv", out=Path("out"),
                                          which="ema"), "ab", 3)
    assert emb_ema[emb_ema.index("--which") + 1] == "ema" and probe_ema[-1].endswith("seed3/probe.json")
    from abvid.pipeline.errors import UsageError
    with pytest.raises(UsageError, match="one of student, ema"):
        commands(Plan(config="c.yaml", shards="S", probe="P", labels="L.csv", out=Path("out"), which="teacher"),
                 "ab", 0)


def test_a_trained_run_is_not_pretrained_again_for_the_other_encoder(tmp_path, monkeypatch):
    import abvid.train.ablation as ablation
    plan = Plan(config="c.yaml", shards="S", probe="P", labels="L.csv", out=tmp_path, which="student")
    run = plan.run_dir("ab", 0)
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 2}}))
    (run / "checkpoints" / "ckpt-00000001.pt").write_bytes(b"")
    called = []

    def fake_run(cmd, stdout, stderr):
        called.append(cmd[3])
        if cmd[3] == "pretrain":           # the run finishes: its final checkpoint appears
            (run / "checkpoints" / "ckpt-00000002.pt").write_bytes(b"")
        if cmd[3] == "probe":
            Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"results": [{"method": "knn", "score": 0.5}]}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(ablation.subprocess, "run", fake_run)
    ablation.run_one(plan, "ab", 0, log=lambda m: None)           # step 1 of 2: pretrain resumes
    assert called == ["pretrain", "embed", "probe"] and (run / "probe-student.json").is_file()
    called.clear()
    ablation.run_one(Plan(**{**plan.__dict__, "which": "ema"}), "ab", 0, log=lambda m: None)
    assert called == ["embed", "probe"] and (run / "probe.json").is_file()      # trained: only embed and probe
    assert (run / "embed.log").is_file() and (run / "embed-student.log").is_file()


def test_table_means_stds_and_paired_differences():
    results = {"base": {0: {"linear": 0.50, "knn": 0.40}, 1: {"linear": 0.60, "knn": 0.50},
                        2: {"linear": 0.55, "knn": 0.45}},
               "ab": {0: {"linear": 0.53, "knn": 0.44}, 1: {"linear": 0.62, "knn": 0.55},
                      2: {"linear": 0.58, "knn": 0.49}}}
    t = table(results)
    base, ab = t["rows"]["base"], t["rows"]["ab"]
    assert math.isclose(base["linear"]["mean"], 0.55) and math.isclose(base["linear"]["std"], 0.05)
    assert "diff_vs_base" not in base["linear"]
    d = ab["knn"]["diff_vs_base"]                                     # differences 0.04, 0.05, 0.04
    assert [round(v, 6) for v in d["values"]] == [0.04, 0.05, 0.04]
    assert math.isclose(d["mean"], 0.13 / 3) and math.isclose(d["se"], 0.005773502691896 / math.sqrt(3), rel_tol=1e-6)
    assert d["above_2se"]                                             # a small but consistent gain
    lin = ab["linear"]["diff_vs_base"]                                # 0.03, 0.02, 0.03: also consistent
    assert lin["above_2se"]
    noisy = table({"base": results["base"], "ab": {0: {"linear": 0.60, "knn": 0.30}, 1: {"linear": 0.55, "knn": 0.6},
                                                   2: {"linear": 0.50, "knn": 0.45}}})
    assert not noisy["rows"]["ab"]["linear"]["diff_vs_base"]["above_2se"]
    md = format_table(t)
    assert "| AB (gamma = 0) | 3 | 57.7 ± 4.5 | 49.3 ± 5.5 | +2.7 ± 0.3 (>2SE) | +4.3 ± 0.3 (>2SE) |" in md


def test_pool_takes_one_cell_per_table_and_the_se_over_tables(tmp_path):
    base = {s: {"linear": 0.5, "knn": 0.4} for s in range(3)}
    tables = [table({"base": base, "ab": {s: {"linear": 0.5 + g, "knn": 0.4 - g} for s in range(3)}})
              for g in (0.01, 0.03, -0.01)]                     # table means +1, +3, -1 points on linear
    tables.append(table({"base": base}))                        # a table without the row: not a cell
    p = pool(tables, "ab")
    assert p["linear"]["n"] == 3 and p["linear"]["above_0"] == 2
    assert math.isclose(p["linear"]["mean"], 0.01) and math.isclose(p["knn"]["mean"], -0.01)
    assert math.isclose(p["linear"]["se"], 0.02 / math.sqrt(3))   # std of (1, 3, -1) points is 2
    for t, g in zip(tables, (0.01, 0.03, -0.01)):                 # an ablation 1 point below AB in every table
        t["rows"]["ab_no_actions"] = table({"base": base, "ab_no_actions": {
            s: {"linear": 0.5 + g - 0.01 * (1 + s % 2), "knn": 0.4} for s in range(3)}})["rows"]["ab_no_actions"]
    q = pool(tables, "ab_no_actions", against="ab")
    assert q["linear"]["n"] == 3 and q["linear"]["above_0"] == 0
    assert math.isclose(q["linear"]["mean"], -0.04 / 3) and math.isclose(q["linear"]["se"], 0.0, abs_tol=1e-12)
    for i, t in enumerate(tables):                               # the example script reads the tables' JSON
        (tmp_path / f"t{i}").mkdir()
        results_path(tmp_path / f"t{i}").write_text(json.dumps(t))
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "pool_tables.py"),
                        *[str(tmp_path / f"t{i}") for i in range(4)]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "linear: ab - base +1.00 ± 1.15 mAP points (mean ± SE over 3 tables; above 0 in 2)" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "pool_tables.py"), "--row", "ab_no_actions",
                        "--against", "ab", *[str(tmp_path / f"t{i}") for i in range(4)]],
                       capture_output=True, text=True, timeout=60)
    assert "linear: ab_no_actions - ab -1.33 ± 0.00 mAP points (mean ± SE over 3 tables; above 0 in 0)" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "pool_tables.py"), str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "abvid ablate --table-only" in r.stderr

    r = subprocess.run([sys.executable, str(ROOT / "examples" / "pool_tables.py"),
                        *[str(tmp_path / f"t{i}") for i in range(4)], "--bar-power", "1.3", "1.7", "--bar-seeds", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "bar power, 3 seeds per table: clears linear" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "pool_tables.py"), str(tmp_path / "t0"),
                        "--bar-power", "-1", "1.7"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--bar-power takes two SDs >= 0" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "pool_tables.py"), str(tmp_path / "t0"),
                        str(tmp_path / "t1"), "--bar-power", "1.3", "1.7"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "at least 3 of them" in r.stderr            # two tables: too few to model


def _pooled_cells(linear: list[float], knn: list[float], seeds: int = 1) -> dict:
    return {"linear": {"cells": linear, "n": len(linear), "seeds": [seeds] * len(linear)},
            "knn": {"cells": knn, "n": len(knn), "seeds": [seeds] * len(knn)}}


def test_bar_pass_rate_matches_the_t_distribution_without_a_gain():
    # no gain and no spread between corpora: "mean > 2 SE" over 3 seeds is Student's t (2 df) above 2,
    # P = (1 - 2 / sqrt(6)) / 2 = 0.0918; over 10 seeds (9 df) about 0.038
    flat = _pooled_cells([0.001, -0.001, 0.0, 0.0005], [0.0, 0.001, -0.001, 0.0])
    r3 = bar_pass_rate(flat, (0.02, 0.02), seeds=3)
    assert r3["corpus_sd"] == [0.0, 0.0]
    assert abs(r3["linear"] - (1 - 2 / math.sqrt(6)) / 2) < 0.004 and abs(r3["knn"] - 0.0918) < 0.004
    assert r3["both"] < r3["linear"]
    assert abs(bar_pass_rate(flat, (0.02, 0.02), seeds=10)["linear"] - 0.038) < 0.004


def test_bar_pass_rate_rises_with_the_gain_and_falls_with_the_spread_between_corpora():
    big = _pooled_cells([0.10, 0.11, 0.09, 0.10], [0.10, 0.09, 0.11, 0.10])      # 10 points, little spread
    assert bar_pass_rate(big, (0.01, 0.01), seeds=3)["both"] > 0.95
    steady = _pooled_cells([0.01, 0.012, 0.008, 0.01], [0.01, 0.008, 0.012, 0.01])
    scattered = _pooled_cells([0.04, -0.02, 0.03, -0.01], [-0.02, 0.04, -0.01, 0.03])  # same 1-point mean
    a, b = bar_pass_rate(steady, (0.01, 0.01), seeds=10), bar_pass_rate(scattered, (0.01, 0.01), seeds=10)
    assert b["corpus_sd"][0] > 0.02 and a["corpus_sd"][0] < 0.005 and b["rho"] < 0
    assert a["linear"] > b["linear"] + 0.1
    with pytest.raises(ValueError, match="both probes"):
        bar_pass_rate({"linear": big["linear"]}, (0.01, 0.01))


def _fake_run(out: Path, row: str, seed: int, linear: float, knn: float, finished: bool = True) -> None:
    run = out / "runs" / row / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "ablation.json").write_text(json.dumps({"row": row, "seed": seed}))
    if finished:
        (run / "probe-student.json").write_text(json.dumps({"results": [{"method": "linear", "score": linear},
                                                                        {"method": "knn", "score": knn}]}))


def test_the_table_is_rebuilt_from_the_run_folders_alone(tmp_path):
    _fake_run(tmp_path, "base", 0, 0.5, 0.4)
    _fake_run(tmp_path, "base", 1, 0.6, 0.5)
    _fake_run(tmp_path, "ab", 0, 0.55, 0.45)
    _fake_run(tmp_path, "ab", 1, 0.6, 0.6, finished=False)           # interrupted: not in the table
    assert collect(tmp_path) == {"base": {0: {"linear": 0.5, "knn": 0.4}, 1: {"linear": 0.6, "knn": 0.5}},
                                 "ab": {0: {"linear": 0.55, "knn": 0.45}}}
    md = write_table(tmp_path)
    assert "| AB (gamma = 0) | 1 | 55.0 | 45.0 | +5.0 | +5.0 |" in md
    saved = json.loads((tmp_path / "results-student.json").read_text())
    assert saved["rows"]["ab"]["knn"]["diff_vs_base"]["n"] == 1
    assert (tmp_path / "table-student.md").read_text().startswith(md) and saved["encoder"] == "student"
    assert "student (online) encoder" in (tmp_path / "table-student.md").read_text()
    assert collect(tmp_path, "ema") == {}                            # no EMA probe yet
    (tmp_path / "runs" / "ab" / "seed0" / "probe.json").write_text(
        json.dumps({"results": [{"method": "linear", "score": 0.7}, {"method": "knn", "score": 0.3}]}))
    assert collect(tmp_path, "ema") == {"ab": {0: {"linear": 0.7, "knn": 0.3}}}
    write_table(tmp_path, "ema")
    assert "EMA (teacher) encoder" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["encoder"] == "ema"
    assert (tmp_path / "table-student.md").read_text().startswith(md)         # the student table is left as it was


def test_a_run_folder_of_other_settings_is_refused_not_reused(tmp_path):
    from abvid.pipeline.errors import UsageError
    from abvid.train.ablation import _meta, is_done
    plan = Plan(config="c.yaml", shards="S", probe="P", labels="L.csv", out=tmp_path)
    run = plan.run_dir("ab", 0)
    run.mkdir(parents=True)
    (run / "ablation.json").write_text(json.dumps(_meta(plan, "ab", 0)))
    assert not is_done(plan, "ab", 0)                                 # same plan, unfinished: run it
    (run / "probe.json").write_text("{}")
    assert not is_done(plan, "ab", 0)                                 # probed through the EMA encoder only
    assert is_done(Plan(**{**plan.__dict__, "which": "ema"}), "ab", 0)
    (run / "probe-student.json").write_text("{}")
    assert is_done(plan, "ab", 0)
    other = Plan(config="c.yaml", shards="S", probe="P", labels="L.csv", out=tmp_path, overrides=("train.steps=5",))
    with pytest.raises(UsageError, match="holds a run with other settings \\(overrides"):
        is_done(other, "ab", 0)


def test_a_finished_run_of_an_edited_config_file_is_refused(tmp_path):
    """The same config path with other settings (the file edited since) must not pass a finished run off as
    this plan's; a change that does not alter what a run learns (logging) leaves it finished."""
    from abvid.pipeline.config import load_config, to_dict
    from abvid.pipeline.errors import UsageError
    from abvid.train.ablation import _meta, is_done
    from abvid.train.config import PretrainConfig
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"lr": 1e-3, "log_every": 10}}))
    plan = Plan(config=str(cfg), shards="S", probe="P", labels="L.csv", out=tmp_path / "abl")
    run = plan.run_dir("ab", 0)
    run.mkdir(parents=True)
    (run / "ablation.json").write_text(json.dumps(_meta(plan, "ab", 0)))
    saved = to_dict(load_config(PretrainConfig, str(cfg), plan.run_overrides("ab", 0)))
    (run / "config.yaml").write_text(yaml.safe_dump(saved))          # what pretrain saves
    (run / "probe-student.json").write_text("{}")
    assert is_done(plan, "ab", 0)
    cfg.write_text(yaml.safe_dump({"train": {"lr": 1e-3, "log_every": 5}}))
    assert is_done(plan, "ab", 0)                                      # logging only: still this plan's run
    cfg.write_text(yaml.safe_dump({"train": {"lr": 5e-4, "log_every": 10}}))
    with pytest.raises(UsageError, match=r"trained with other settings than .*c\.yaml now gives it "
                                         r"\(train\.lr: 0\.001 -> 0\.0005\)"):
        is_done(plan, "ab", 0)


def test_cli_usage_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "abvid.tools.cli", "ablate", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "CONFIG.yaml, --shards, --probe, --labels required" in r.stderr
    r = subprocess.run([sys.executable, "-m", "abvid.tools.cli", "ablate", "--table-only", "--out",
                        str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "holds no ablation runs" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)       # many CLI subprocesses: pytest's 300 s default trips on a loaded machine
def test_a_real_ablation_runs_probes_tabulates_and_skips_finished_runs(tmp_path):
    write_test_shards(tmp_path / "pre", videos=4, labels=("red", "blue"))
    write_test_shards(tmp_path / "probe", videos=6, labels=("red", "blue"))
    (tmp_path / "labels.csv").write_text("video,start_s,end_s,label\n" + "".join(
        f"vid{v:03d}_deadbeef,0,1000,{('red', 'blue')[v % 2]}\n" for v in range(6)))
    cfg = {"data": {"workers": 0, "shuffle_buffer": 4, "global_size": 32, "local_size": 16, "n_local": 2},
           "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2},
           "objective": {"name": "simclr", "proj_hidden_dim": 32, "proj_dim": 16, "decoder_dim": 16,
                         "decoder_depth": 1, "decoder_heads": 2},
           "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "ckpt_every": 2,
                     "device": "cpu", "threads": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "abvid.tools.cli", "ablate", str(tmp_path / "cfg.yaml"), "--shards",
           str(tmp_path / "pre"), "--probe", str(tmp_path / "probe"), "--labels", str(tmp_path / "labels.csv"),
           "--out", str(tmp_path / "abl"), "--seeds", "0", "1", "--rows", "random", "base", "--jobs", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 runs already done, 4 to run" in r.stdout and "| base method | 2 |" in r.stdout
    t = json.loads((tmp_path / "abl" / "results-student.json").read_text())
    assert set(t["rows"]) == {"random", "base"} and t["rows"]["random"]["knn"]["diff_vs_base"]["n"] == 2
    cfg_saved = yaml.safe_load((tmp_path / "abl" / "runs" / "base" / "seed1" / "config.yaml").read_text())
    assert cfg_saved["train"]["seed"] == 1 and cfg_saved["data"]["seed"] == 1      # seeds recorded per run
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 runs already done, 0 to run" in again.stdout
    # the EMA encoder of the same runs: nothing is trained again; neither row has a teacher of its own
    # (base keeps none; random init's teacher is its untrained student), so the scores must be the same
    pre_log = (tmp_path / "abl" / "runs" / "base" / "seed0" / "pretrain.log").read_text()
    ema = subprocess.run(cmd + ["--which", "ema"], capture_output=True, text=True, timeout=300)
    assert ema.returncode == 0 and "0 runs already done, 4 to run" in ema.stdout, ema.stderr
    assert (tmp_path / "abl" / "runs" / "base" / "seed0" / "pretrain.log").read_text() == pre_log
    assert collect(tmp_path / "abl", "ema") == collect(tmp_path / "abl")
    cfg["train"]["lr"] = 1e-4              # the same file, edited: its finished runs are not this plan's any more
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    edited = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert edited.returncode == 2 and "train.lr" in edited.stderr, edited.stdout + edited.stderr
    assert ROWS["base"][1] == ("objective.bootstrap=false",)
