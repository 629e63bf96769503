"""hf-qat sweep: branched tails equal unbranched runs, resume after a kill, sharding, the row schema."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from hf_qat.planner import load_runs, optimal_qat_fraction
from hf_qat.sweep import SweepConfig, plan_runs, run_sweep, token_accounting
from hf_qat.sweep.data import load_sweep_data
from hf_qat.sweep.engine import evaluate, load_checkpoint, build_model
from hf_qat.sweep.results import ROW_KEYS, read_rows
from hf_qat.sweep.runner import train_unbranched

TINY = {
    "sizes": {"s32": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 2,
                      "num_key_value_heads": 1}},
    "data": "demo", "vocab_size": 320, "sequence_length": 32, "batch_size": 4, "learning_rate": 3e-3,
    "warmup_steps": 4, "budgets": [1280, 2560], "bits": [2], "fractions": [0.0, 0.25, 0.5, 1.0],
    "schedules": ["fused", "classic"], "group_size": 16, "eval_tokens": 512, "seed": 0,
}


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    summary = run_sweep(TINY, out, progress=False, log=quiet, save_models=True)
    return out, summary


def rows_by_key(path) -> dict[str, dict]:
    return {row["key"]: row for row in read_rows(os.path.join(path, "runs.jsonl"))}


def test_branched_tails_are_bit_identical_to_unbranched_runs(tiny_sweep):
    """On one CPU thread order, a tail loaded from the trunk checkpoint (weights and AdamW state saved
    exactly) replays the same batches with the same LR multipliers as the run from scratch, and the
    dormant QAT layers compute F.linear exactly, so the final weights are bitwise equal."""
    out, _ = tiny_sweep
    config = SweepConfig.from_dict(TINY)
    runs = {r.key: r for r in plan_runs(config)}
    rows = rows_by_key(out)
    data = load_sweep_data(config, max(r.total_steps for r in runs.values()) * config.batch_size,
                           cache_dir=os.path.join(out, "cache"))
    checked = 0
    for key in ("s32/seed0/2560/2/0.5/fused", "s32/seed0/2560/2/0.25/classic", "s32/seed0/2560/fp/0/fp",
                "s32/seed0/1280/2/1/fused"):
        run = runs[key]
        assert 0 <= run.branch_step <= run.switch_step
        if run.fraction not in (0.0, 1.0):
            assert run.branch_step > 0  # a real branch, not a run from scratch
        reference = train_unbranched(config, run, data)
        branched = build_model(config, run.size, run.seed)
        if run.schedule != "fp":
            from hf_qat import prepare_model_for_qat

            prepare_model_for_qat(branched, config.qat_config(run.bits))
        load_checkpoint(os.path.join(out, "models", key.replace("/", "_") + ".pt"), branched, None)
        ref_state, branch_state = reference.state_dict(), branched.state_dict()
        assert ref_state.keys() == branch_state.keys()
        for name, tensor in ref_state.items():
            assert torch.equal(tensor, branch_state[name]), f"{key}: {name} differs"
        assert evaluate(reference, data.eval) == rows[key]["loss"]
        checked += 1
    assert checked == 4


def test_rows_schema_and_fit_reads_them(tiny_sweep):
    out, summary = tiny_sweep
    rows = read_rows(os.path.join(out, "runs.jsonl"))
    config = SweepConfig.from_dict(TINY)
    assert len(rows) == len(plan_runs(config)) == summary.rows_written
    assert len({r["key"] for r in rows}) == len(rows)
    for row in rows:
        assert all(k in row for k in ROW_KEYS), row
        assert row["fp_tokens"] + row["qat_tokens"] == row["tokens"]
        assert row["loss"] > 0 and row["eval_tokens"] == 16 * 31
        if row["schedule"] == "fp":
            assert row["bits"] is None and row["qat_tokens"] == 0
        elif row["schedule"] == "ptq":
            assert row["bits"] == 2 and row["qat_tokens"] == 0
        else:
            assert row["qat_tokens"] == (row["total_steps"] - row["switch_step"]) * 128
            s = row["tokens"] / (row["num_params"] * row["bits"] / 8)
            assert row["tokens_per_param_byte"] == pytest.approx(s, rel=1e-12)
            assert row["paper_fraction"] == optimal_qat_fraction(s)
    runs = load_runs(os.path.join(out, "runs.jsonl"))
    assert len(runs) == len(rows)
    # the tokens the branched grid trained, against the same rows trained one by one
    tokens = token_accounting(plan_runs(config), config.tokens_per_step)
    assert summary.trained_tokens == tokens["branched_tokens"] < tokens["unbranched_tokens"]


def test_rerun_is_a_no_op_and_a_partial_line_is_repaired(tiny_sweep, tmp_path):
    out, _ = tiny_sweep
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("runs.jsonl", "sweep_config.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    # simulate a kill in the middle of the last write
    lines = (copy / "runs.jsonl").read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])
    (copy / "runs.jsonl").write_bytes(b"".join(lines[:-1]) + lines[-1][:40])
    os.symlink(out / "cache", copy / "cache")
    summary = run_sweep(TINY, copy, progress=False, log=quiet)
    assert summary.rows_written == 1
    rows = read_rows(copy / "runs.jsonl")
    assert len(rows) == len(lines) and len({r["key"] for r in rows}) == len(rows)
    assert rows_by_key(copy)[last["key"]]["loss"] == last["loss"]  # recomputed exactly
    again = run_sweep(TINY, copy, progress=False, log=quiet)
    assert again.rows_written == 0 and again.trained_tokens == 0


def test_kill_and_resume_finishes_only_the_missing_rows(tiny_sweep, tmp_path):
    out, _ = tiny_sweep
    expected = rows_by_key(out)
    config_path = tmp_path / "sweep.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(TINY))
    target = tmp_path / "killed"
    command = [sys.executable, "-m", "hf_qat.cli", "sweep", str(config_path), "--out", str(target), "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs_file = target / "runs.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if runs_file.exists() and len(runs_file.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(read_rows(runs_file))
    assert 3 <= before < len(expected), "the kill must land in the middle of the sweep"
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_rows(runs_file)
    assert len(rows) == len(expected) and len({r["key"] for r in rows}) == len(rows)
    for row in rows:
        assert row["loss"] == expected[row["key"]]["loss"], row["key"]


def test_shards_concatenate_to_the_whole_sweep(tiny_sweep, tmp_path):
    out, _ = tiny_sweep
    expected = rows_by_key(out)
    merged = {}
    for index in range(2):
        target = tmp_path / f"shard{index}"
        run_sweep(TINY, target, shard=f"{index}/2", progress=False, log=quiet)
        for key, row in rows_by_key(target).items():
            assert key not in merged
            merged[key] = row
    assert merged.keys() == expected.keys()
    assert all(merged[k]["loss"] == expected[k]["loss"] for k in expected)


def test_bad_sweep_files_are_refused_before_anything_trains(tmp_path):
    from hf_qat.sweep import SweepConfigError

    cases = [
        ({"learning_rte": 1e-3}, r"'learning_rte'.*allowed: sizes, budgets"),
        ({"fractions": [0.0, 1.5]}, r"'fractions' = 1.5.*numbers in \[0, 1\]"),
        ({"budgets": [64]}, r"'budgets' = 64.*>= one step \(batch_size x sequence_length = 128\)"),
        ({"schedules": ["cosine"]}, r"'schedules' = 'cosine'.*fused, classic"),
        ({"bits": [7]}, r"'bits' = 7.*1, 1.58"),
        ({"group_size": 24}, r"'group_size' = 24.*power of two"),
        ({"extra": [{"sizes": ["s99"]}]}, r"'extra\[0\].sizes' = 's99'.*names from sizes: s32"),
        ({"data": {"text_files": ["a.txt"], "dataset": "x"}}, r"'data'.*exactly one of dataset, text_files"),
        ({"sizes": {"s32": {"hidden_size": 32, "layers": 2}}}, r"'sizes.s32.layers'.*hidden_size, num_hidden_layers"),
        ({"scale_lr": 0.02, "scale_lr_multiplier": 10}, r"'scale_lr' = 0.02.*unset when scale_lr_multiplier is set"),
        ({"scale_lr": -1}, r"'scale_lr' = -1"),
        ({"fp_cooldown_fraction": 1.0}, r"'fp_cooldown_fraction' = 1.0.*a number in \[0, 1\)"),
        ({"qat_warmup_fraction": -0.5}, r"'qat_warmup_fraction' = -0.5"),
        ({"decay_shape": "step"}, r"'decay_shape' = 'step'.*linear, cosine, 1-sqrt"),
    ]
    for change, message in cases:
        with pytest.raises(SweepConfigError, match=message):
            run_sweep({**TINY, **change}, tmp_path / "bad", progress=False, log=quiet)
    # a size whose width the group size does not divide: named before anything trains
    from hf_qat import QATConfigError

    odd = {**TINY, "sizes": {"s24": {"hidden_size": 24, "num_hidden_layers": 1, "intermediate_size": 48,
                                     "num_attention_heads": 2, "num_key_value_heads": 1}}}
    with pytest.raises(QATConfigError, match=r"group_size.*input width 24"):
        run_sweep(odd, tmp_path / "bad", progress=False, log=quiet)
    assert not (tmp_path / "bad" / "runs.jsonl").exists() and not (tmp_path / "bad" / "trunks").exists()
    # other settings in a folder that holds rows: refused, naming the key
    with pytest.raises(SweepConfigError, match=r"'learning_rate' = 0.01.*0.003, the value the rows"):
        out = tmp_path / "mixed"
        run_sweep({**TINY, "budgets": [1280], "bits": [2], "fractions": [0.0]}, out, progress=False, log=quiet)
        run_sweep({**TINY, "learning_rate": 1e-2}, out, progress=False, log=quiet)


def test_a_grid_that_needs_more_data_is_refused_and_a_smaller_one_reads_the_same_data(tmp_path):
    """The tokenized data depends on the largest budget: growing it would reuse trunks on other batches
    and put losses on another eval set in the same runs.jsonl."""
    from hf_qat.sweep import SweepConfigError

    small = {**TINY, "budgets": [1280], "bits": [2], "fractions": [0.0], "schedules": ["fused"]}
    run_sweep(small, tmp_path, progress=False, log=quiet)
    rows, saved = (tmp_path / "runs.jsonl").read_text(), (tmp_path / "sweep_config.json").read_text()
    recorded = json.loads((tmp_path / "sweep_data.json").read_text())["train_blocks"]
    assert recorded == 1280 // 128 * 4
    with pytest.raises(SweepConfigError, match=r"'budgets' = 2560.*at most 10 steps.*another --out folder"):
        run_sweep({**small, "budgets": [1280, 2560]}, tmp_path, progress=False, log=quiet)
    assert (tmp_path / "runs.jsonl").read_text() == rows  # nothing trained, nothing written
    assert (tmp_path / "sweep_config.json").read_text() == saved
    run_sweep({**small, "budgets": [640, 1280]}, tmp_path, progress=False, log=quiet)  # within the data: fine
    assert json.loads((tmp_path / "sweep_data.json").read_text())["train_blocks"] == recorded
    assert len(os.listdir(tmp_path / "cache")) == 2  # one data file (and its tokenizer): the same data


def test_tiny_sweep_fit_plan_and_report_end_to_end(tiny_sweep, tmp_path, capsys):
    from hf_qat.cli import main
    from hf_qat.sweep.report import sweep_report

    out, _ = tiny_sweep
    law = tmp_path / "law.json"
    assert main(["fit", str(out / "runs.jsonl"), "-o", str(law), "--starts", "4"]) == 0
    capsys.readouterr()
    assert main(["plan", "--params", "41K", "--tokens", "2560", "--bits", "2", "--steps", "20", "--law", str(law)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if "ParetoQ" in line or "half" in line or "planner" in line]
    assert len(rows) == 3 and all(re.search(r"\d\.\d{4}\s*\S?\s*$", r) for r in rows), printed  # predicted losses
    assert main(["best-bits", "--memory", "10KB", "--tokens", "2560", "--law", str(law), "--candidates", "2,4"]) == 0

    report = sweep_report(out, law=str(law))
    names = sorted(os.path.basename(f) for f in report.figures)
    assert names == ["fused_minus_classic.png", "loss_vs_fraction_2.png", "optimum_vs_S.png"]
    text = open(report.markdown_path).read()
    assert "| s32 | 0 | 2.56e+03 | 2 |" in text and "MAE of f_hat" in text and "Fused minus classic" in text
    tokens = report.summary["tokens"]
    assert "Tokens trained" in text and tokens["branched_tokens"] < tokens["unbranched_tokens"]
    assert report.summary["fused_minus_classic"]["2"]["pairs"] == 6  # fractions 0.25, 0.5 and 1 at two budgets


@pytest.mark.slow
def test_torchrun_ranks_take_shares_of_one_sweep(tiny_sweep, tmp_path):
    """Under torchrun each rank runs the tasks of shard RANK/WORLD_SIZE into the same folder."""
    import yaml

    out, _ = tiny_sweep
    config_path = tmp_path / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(TINY))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hf_qat.cli",
               "sweep", str(config_path), "--out", str(tmp_path / "ddp"), "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard 0/2" in result.stdout + result.stderr and "shard 1/2" in result.stdout + result.stderr
    rows = read_rows(tmp_path / "ddp" / "runs.jsonl")
    expected = rows_by_key(out)
    assert sorted(r["key"] for r in rows) == sorted(expected)
    assert all(abs(r["loss"] - expected[r["key"]]["loss"]) < 1e-4 for r in rows)  # one thread per rank here


def test_observed_optimum_restates_the_parabola_in_log_f():
    import math as m

    from hf_qat.sweep.analysis import refined_optimum

    true = 0.3
    losses = {f: 3.0 + 0.2 * (m.log(f) - m.log(true)) ** 2 for f in (0.1, 0.25, 0.5, 1.0)}
    optimum = refined_optimum({0.0: 4.0, **losses})
    assert optimum.measured and optimum.value == pytest.approx(true, rel=1e-9)  # exact for a parabola in log f
    assert str(optimum) == "0.300"


def test_moe_comparison_restates_the_mae_with_total_and_active_parameters():
    from hf_qat.planner import tokens_per_parameter_byte
    from hf_qat.sweep.analysis import cells, moe_comparison

    rows = []
    for size, n, active, optimum in (("moe", 700_000, 250_000, 0.25), ("dense", 250_000, None, 0.5)):
        for fraction in (0.0, 0.1, 0.25, 0.5, 1.0):
            loss = 3.0 + (fraction - optimum) ** 2 if fraction else 4.0
            row = {"size": size, "seed": 0, "budget": 1e6, "bits": 2, "num_params": n, "fp_tokens": 0,
                   "qat_tokens": 1_000_000, "schedule": "fused" if fraction else "ptq", "fraction": fraction, "loss": loss}
            if active:
                row["active_params"] = active
            rows.append(row)
    cell_list = cells(rows)
    result = moe_comparison(cell_list)
    moe = next(c for c in cell_list if c.active_params)
    for n, key in ((700_000, "mae_total"), (250_000, "mae_active")):
        expected = abs(moe.observed_optimum.value - optimal_qat_fraction(tokens_per_parameter_byte(n, 1e6, 2)))
        assert result["moe"][key] == pytest.approx(expected)
    assert result["moe"]["cells"] == 1 and result["dense"]["cells"] == 1
    assert moe_comparison([c for c in cell_list if not c.active_params]) is None
