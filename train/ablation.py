"""The seeded ablation of annotation bootstrapping: which rows to run, how to run one, and the table.

    abvid ablate examples/configs/tiny_cpu.yaml --shards data/shards --probe data/probe_shards \
        --labels data/probe/annotations.csv --out ablation/simclr --seeds 0 1 2

Each (row, seed) is one run folder ``OUT/runs/<row>/seed<k>``: ``abvid pretrain`` with the row's
overrides and ``train.seed = data.seed = k`` (so a row and its base share the initial weights and
the sampled views of every step: the comparison is paired), then ``abvid embed`` of the probe
videos, then ``abvid probe`` (linear and k-NN, split by video). Every step is a subprocess of the
real CLI, so a run is what a user gets. A run folder is finished when its probe file exists;
``ablation.json`` beside it records the row, seed and overrides, so the table is rebuilt from the
run folders alone (``--table-only``), and a rerun of the same command skips what is done and
resumes what is not (pretrain resumes from its checkpoints).

Which encoder of a run is probed (``Plan.which``): ``student``, the default, embeds the student
(online) encoder of every run, the network the base method (which keeps no teacher) is probed
through, so every row compares like with like; ``ema`` embeds the EMA (teacher) encoder where the
run has one and its student where it has none (plain SimCLR, CLIP, AB without a target network).
In a short run the EMA encoder lags: with momentum 0.99 -> 0.999 over 300 steps it is still 19%
the random initialisation at the end, and probing it cost AB 4.97 mAP points summed over four
validation comparisons (docs/EXPERIMENTS.md, "the fourth experiment"). The two are kept apart in the run folder
(``emb`` / ``probe.json`` for ``ema``, ``emb-student`` / ``probe-student.json``; tables
``table.md`` / ``table-student.md``), so one training run serves both and neither overwrites the
other.

The table (:func:`table`): per row and probe, the mean and sample standard deviation over seeds;
per row, the mean of the per-seed paired differences against the base method and its standard
error ``std(d) / sqrt(n)``; ``>2SE`` marks a difference larger than twice its standard error.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from abvid.pipeline.errors import UsageError

# name -> (title, overrides). "ab" is the default AB config (gamma from the config, 0 by default).
ROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "random": ("random init", ("train.steps=0",)),
    "base": ("base method", ("objective.bootstrap=false",)),
    "ab": ("AB (gamma = 0)", ("objective.bootstrap=true", "objective.gamma=0.0")),
    "ab_gamma": ("AB (gamma = 0.5)", ("objective.bootstrap=true", "objective.gamma=0.5")),
    "ab_no_time": ("AB without time", ("objective.bootstrap=true", "objective.gamma=0.0", "objective.temporal=false")),
    "ab_no_actions": ("AB without action tokens",
                      ("objective.bootstrap=true", "objective.gamma=0.0", "objective.action_tokens=false")),
    "ab_no_target": ("AB without target network",
                     ("objective.bootstrap=true", "objective.gamma=0.0", "objective.target_network=false")),
}
PROBES = ("linear", "knn")
WHICH = ("student", "ema")      # the encoder a run is probed through; the first is the default


@dataclass(frozen=True)
class Plan:
    """Everything one ablation needs; each run's commands follow from it."""
    config: str
    shards: str
    probe: str                  # what `abvid embed` reads: probe videos or their shards
    labels: str
    out: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    rows: tuple[str, ...] = tuple(ROWS)
    overrides: tuple[str, ...] = ()          # for every run (e.g. objective.name=dino)
    probe_seed: int = 0                       # the by-video split of the probe (fixed across runs)
    which: str = WHICH[0]                     # encoder probed: "student" or "ema" (teacher where there is one)

    def run_dir(self, row: str, seed: int) -> Path:
        return self.out / "runs" / row / f"seed{seed}"

    def run_overrides(self, row: str, seed: int) -> list[str]:
        return [f"data.shards={self.shards}", *self.overrides, *ROWS[row][1], f"train.seed={seed}",
                f"data.seed={seed}"]


def _suffix(which: str) -> str:
    """'' for the EMA encoder (the original file names), '-student' for the student."""
    if which not in WHICH:
        raise UsageError(f"which encoder to probe: one of {', '.join(WHICH)}, got {which!r}")
    return "" if which == "ema" else f"-{which}"


def probe_file(run: Path, which: str) -> Path:
    """The probe scores of one run folder for the chosen encoder."""
    return run / f"probe{_suffix(which)}.json"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "abvid.tools.cli", *args]


def commands(plan: Plan, row: str, seed: int) -> list[list[str]]:
    """The three CLI calls of one run (pretrain, embed, probe), each resumable."""
    run, sfx = plan.run_dir(row, seed), _suffix(plan.which)
    sets = [a for o in plan.run_overrides(row, seed) for a in ("--set", o)]
    return [_cli("pretrain", plan.config, "--out", str(run), *sets),
            _cli("embed", "--checkpoint", str(run / "checkpoints"), plan.probe, "--out", str(run / f"emb{sfx}"),
                 "--which", plan.which, "--no-progress"),
            _cli("probe", "--embeddings", str(run / f"emb{sfx}"), "--labels", plan.labels, "--method", *PROBES,
                 "--seed", str(plan.probe_seed), "--out", str(probe_file(run, plan.which)))]


def is_done(plan: Plan, row: str, seed: int) -> bool:
    """True when the run folder holds a finished run of this very plan (its probe file for
    ``plan.which`` exists).

    A folder left by a run with other overrides, config or probe refuses: its numbers would be
    reported as this plan's. So does a run whose saved ``config.yaml`` differs from what the config
    file now gives it (the file was edited since: same path, other settings).
    """
    run = plan.run_dir(row, seed)
    meta_path = run / "ablation.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        want = _meta(plan, row, seed)
        differs = [k for k in want if meta.get(k) != want[k]]
        if differs:
            raise UsageError(f"{run} holds a run with other settings ({', '.join(differs)}: "
                             f"{[meta.get(k) for k in differs]} vs {[want[k] for k in differs]}); use another --out, "
                             "or delete that run folder to redo it")
        changed = _config_changes(plan, row, seed)
        if changed:
            raise UsageError(f"{run} was trained with other settings than {plan.config} now gives it "
                             f"({'; '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}); use another "
                             "--out, or delete that run folder to redo it")
    return probe_file(run, plan.which).is_file()


def _config_changes(plan: Plan, row: str, seed: int) -> list[str]:
    """'key: saved -> now' for every learning setting in which the run's saved config.yaml differs from the
    config this plan gives it today ([] when the run has not saved one yet)."""
    saved_path = plan.run_dir(row, seed) / "config.yaml"
    if not saved_path.is_file():
        return []
    import yaml

    from abvid.pipeline.config import load_config, to_dict
    from abvid.train.config import PretrainConfig
    from abvid.train.loop import SAFE_TO_CHANGE, config_diff
    # what a resume may change minus what the table depends on: the length, and the data (via the overrides)
    bookkeeping = set(SAFE_TO_CHANGE) - {"train.steps", "data.shards"}
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = to_dict(load_config(PretrainConfig, plan.config, plan.run_overrides(row, seed)))
    return [d for d in config_diff(saved, now) if d.split(":")[0] not in bookkeeping]


def _meta(plan: Plan, row: str, seed: int) -> dict:
    return {"row": row, "title": ROWS[row][0], "seed": seed, "overrides": plan.run_overrides(row, seed),
            "config": plan.config, "probe": plan.probe, "labels": plan.labels, "probe_seed": plan.probe_seed}


def run_one(plan: Plan, row: str, seed: int, log=print) -> None:
    """pretrain -> embed -> probe for one (row, seed); raises RuntimeError naming the failed step and its log."""
    run = plan.run_dir(row, seed)
    run.mkdir(parents=True, exist_ok=True)
    (run / "ablation.json").write_text(json.dumps(_meta(plan, row, seed), indent=2) + "\n")
    sfx, trained = _suffix(plan.which), _trained_checkpoint(run)
    for step, cmd in zip(("pretrain", "embed", "probe"), commands(plan, row, seed)):
        if step == "pretrain" and trained is not None:
            continue                               # finished before (probed through the other encoder)
        if step == "embed":                        # the newest checkpoint of the run
            from abvid.train.checkpoint import list_checkpoints
            ckpts = list_checkpoints(run / "checkpoints")
            if not ckpts:
                raise RuntimeError(f"{run}: pretrain wrote no checkpoint")
            cmd[cmd.index(str(run / "checkpoints"))] = str(ckpts[-1])
        # pretrain's log grows (a resumed or already finished run adds to it); embed/probe have one per encoder
        log_path = run / ("pretrain.log" if step == "pretrain" else f"{step}{sfx}.log")
        with open(log_path, "a" if step == "pretrain" else "w") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise RuntimeError(f"{row} seed {seed}: `{' '.join(cmd[2:5])} ...` exited {r.returncode}; "
                               f"see {log_path}")
    log(f"done {row} seed {seed}{sfx}: " + ", ".join(f"{m} {s:.3f}" for m, s in scores(run, plan.which).items()))


def _trained_checkpoint(run: Path) -> Path | None:
    """The final checkpoint of a finished pretraining in ``run`` (its step = the saved config's train.steps)."""
    import yaml

    from abvid.train.checkpoint import ckpt_path

    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        return None
    steps = int((yaml.safe_load(cfg_path.read_text()) or {}).get("train", {}).get("steps", -1))
    path = ckpt_path(run / "checkpoints", steps) if steps >= 0 else None
    return path if path is not None and path.is_file() else None


def scores(run: Path, which: str) -> dict[str, float]:
    """{probe method: score} of a finished run folder, for the chosen encoder."""
    data = json.loads(probe_file(run, which).read_text())
    return {r["method"]: float(r["score"]) for r in data["results"]}


def collect(out: Path, which: str = WHICH[0]) -> dict[str, dict[int, dict[str, float]]]:
    """{row: {seed: {probe: score}}} from every finished run folder under ``out/runs`` (nothing else read)."""
    found: dict[str, dict[int, dict[str, float]]] = {}
    for meta_path in sorted((out / "runs").glob("*/seed*/ablation.json")):
        run = meta_path.parent
        if probe_file(run, which).is_file():
            meta = json.loads(meta_path.read_text())
            found.setdefault(meta["row"], {})[int(meta["seed"])] = scores(run, which)
    return found


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan")


def table(results: dict[str, dict[int, dict[str, float]]], base: str = "base") -> dict:
    """Per row: mean/std per probe over seeds, and paired differences against ``base`` on shared seeds."""
    out: dict = {"rows": {}, "base": base}
    for row in [r for r in ROWS if r in results] + sorted(set(results) - set(ROWS)):
        per_seed = results[row]
        entry: dict = {"title": ROWS.get(row, (row,))[0], "seeds": sorted(per_seed)}
        for probe in PROBES:
            xs = [per_seed[s][probe] for s in sorted(per_seed) if probe in per_seed[s]]
            if not xs:
                continue
            mean, std = _mean_std(xs)
            entry[probe] = {"mean": mean, "std": std, "n": len(xs), "values": xs}
            shared = [s for s in sorted(per_seed) if s in results.get(base, {}) and probe in results[base][s]]
            if row != base and shared:
                d = [per_seed[s][probe] - results[base][s][probe] for s in shared]
                dm, ds = _mean_std(d)
                se = ds / math.sqrt(len(d)) if len(d) > 1 else float("nan")
                entry[probe]["diff_vs_base"] = {"mean": dm, "se": se, "n": len(d), "values": d,
                                                "above_2se": bool(len(d) > 1 and dm > 2 * se)}
        out["rows"][row] = entry
    return out


def _pm(mean: float, spread: float, scale: float, sign: str = "") -> str:
    """'mean ± spread' in points; the spread is left out where one seed gives none."""
    return f"{scale * mean:{sign}.1f}" + ("" if math.isnan(spread) else f" ± {scale * spread:.1f}")


def format_table(t: dict, scale: float = 100.0) -> str:
    """Markdown: mean ± std (x100, i.e. mAP points) per probe, and the paired difference to the base method."""
    head = ("| row | seeds | linear mAP | k-NN mAP | linear - base | k-NN - base |\n"
            "| --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for row, e in t["rows"].items():
        cells = [e["title"], str(len(e["seeds"]))]
        for probe in PROBES:
            p = e.get(probe)
            cells.append("-" if p is None else _pm(p["mean"], p["std"], scale))
        for probe in PROBES:
            d = (e.get(probe) or {}).get("diff_vs_base")
            cells.append("-" if d is None else _pm(d["mean"], d["se"], scale, "+") + (" (>2SE)" if d["above_2se"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_path(out: Path, which: str = WHICH[0]) -> Path:
    """``out/results-student.json`` (``results.json`` for the EMA encoder): the table as JSON."""
    return Path(out) / f"results{_suffix(which)}.json"


def write_table(out: Path, which: str = WHICH[0]) -> str:
    """Rebuild ``table-student.md`` and ``results-student.json`` (``table.md`` and ``results.json`` for the EMA
    encoder) in ``out`` from its run folders; returns the markdown."""
    sfx = _suffix(which)
    t = table(collect(out, which))
    t["encoder"] = which
    md = format_table(t)
    encoder = ("the EMA (teacher) encoder where a run has one, else its student" if which == "ema"
               else "the student (online) encoder of every run")
    results_path(out, which).write_text(json.dumps(t, indent=2) + "\n")
    (out / f"table{sfx}.md").write_text(md + "\n\nmean ± std over seeds; differences: mean ± standard error of "
                                        "the per-seed paired differences against the base method (mAP points); "
                                        f"probed: {encoder}\n")
    return md


def _paired(t: dict, row: str, against: str, probe: str) -> tuple[float, int] | None:
    """Mean over shared seeds of ``row`` minus ``against`` in table ``t``, and the number of those seeds
    (None where either is missing)."""
    a, b = t["rows"].get(row), t["rows"].get(against)
    if not a or not b or probe not in a or probe not in b:
        return None
    va, vb = dict(zip(a["seeds"], a[probe]["values"])), dict(zip(b["seeds"], b[probe]["values"]))
    shared = sorted(set(va) & set(vb))
    return (statistics.fmean(va[s] - vb[s] for s in shared), len(shared)) if shared else None


def pool(tables: list[dict], row: str = "ab", against: str = "base") -> dict:
    """Pool finished ablations (each a :func:`table` result, e.g. one corpus of one experiment): per probe, one
    cell per table, the mean of ``row``'s paired differences against ``against`` (the base method, or another
    row such as ``ab``) there; then the mean over cells and its standard error ``std / sqrt(cells)``.
    Corpus-to-corpus spread enters the SE, so unlike pooling the seeds themselves it does not count seeds that
    share a corpus as independent. Each probe also lists its ``cells`` and how many ``seeds`` each averages."""
    out: dict = {"row": row, "against": against, "tables": len(tables)}
    for probe in PROBES:
        paired = [c for t in tables if (c := _paired(t, row, against, probe)) is not None]
        if paired:
            cells = [c for c, _ in paired]
            mean, std = _mean_std(cells)
            out[probe] = {"mean": mean, "se": std / math.sqrt(len(cells)) if len(cells) > 1 else float("nan"),
                          "n": len(cells), "above_0": sum(c > 0 for c in cells), "cells": cells,
                          "seeds": [k for _, k in paired]}
    return out


def bar_pass_rate(pooled: dict, seed_sd: tuple[float, float], seeds: int = 3, draws: int = 200_000,
                  rng_seed: int = 0) -> dict:
    """How often one ``seeds``-seed table on a fresh corpus would clear the per-table bar (the mean of the
    per-seed paired differences above twice its standard error), per probe and on both at once, if AB's
    gain is what ``pooled`` (a :func:`pool` result over many corpora) measures.

    A model, not a measurement: a corpus' true gain is normal around the pooled mean with the spread between
    corpora (the cells' variance minus the seed part, ``seed_sd**2 / seeds per cell``); each seed adds normal
    noise of ``seed_sd`` (the per-seed SD of paired differences within one table, fractions of mAP like the
    cells, measured elsewhere); both parts are correlated across the two probes as the cells are."""
    import numpy as np

    if any(p not in pooled for p in PROBES) or len({pooled[p]["n"] for p in PROBES}) != 1 \
            or pooled[PROBES[0]]["n"] < 3:
        raise ValueError("bar_pass_rate needs both probes' cells from the same tables, at least 3 of them")
    cells = np.array([pooled[p]["cells"] for p in PROBES]).T                   # (corpora, 2)
    per_cell = np.mean([1 / k for k in pooled[PROBES[0]]["seeds"]])
    seed_var = np.square(seed_sd)
    corpus_sd = np.sqrt(np.maximum(cells.var(axis=0, ddof=1) - seed_var * per_cell, 0.0))
    rho = float(np.nan_to_num(np.clip(np.corrcoef(cells.T)[0, 1], -0.99, 0.99)))
    chol = np.linalg.cholesky(np.array([[1.0, rho], [rho, 1.0]]))
    rng = np.random.default_rng(rng_seed)
    gain = cells.mean(axis=0) + corpus_sd * (rng.standard_normal((draws, 2)) @ chol.T)
    d = gain[:, None] + np.sqrt(seed_var) * (rng.standard_normal((draws, seeds, 2)) @ chol.T)
    ok = d.mean(axis=1) > 2 * d.std(axis=1, ddof=1) / math.sqrt(seeds)
    return {**{p: float(ok[:, i].mean()) for i, p in enumerate(PROBES)}, "both": float(ok.all(axis=1).mean()),
            "corpus_sd": corpus_sd.tolist(), "rho": rho}
