"""The sweep's ``method`` key: validated like QATConfig's, part of each run's identity, absent = as before."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_qat import QATConfig, QATConfigError, prepare_model_for_qat
from hf_qat.sweep import SweepConfig, SweepConfigError, plan_runs, run_sweep
from hf_qat.sweep.analysis import cells
from hf_qat.sweep.data import load_sweep_data
from hf_qat.sweep.engine import build_model, evaluate, load_checkpoint
from hf_qat.sweep.results import read_rows
from hf_qat.sweep.runner import train_unbranched

BASE = {
    "sizes": {"s32": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 2,
                      "num_key_value_heads": 1}},
    "data": "demo", "vocab_size": 320, "sequence_length": 32, "batch_size": 4, "learning_rate": 3e-3,
    "warmup_steps": 2, "budgets": [1280], "bits": [4], "fractions": [0.0, 0.5], "schedules": ["fused"],
    "group_size": 32, "eval_tokens": 512, "seed": 0,
}
MIXED = {**BASE, "extra": [{"method": "mxfp4"}]}


def quiet(_: str) -> None:
    pass


def keys(config: dict) -> list[str]:
    return sorted(r.key for r in plan_runs(SweepConfig.from_dict(config)))


def test_unknown_or_incompatible_methods_are_refused_with_qatconfigs_allowed_values(tmp_path):
    with pytest.raises(QATConfigError) as qat:
        QATConfig(method="fp4")
    allowed = qat.value.allowed  # "auto, lsq, seq, binary, absmax, mxfp4, nvfp4, ..."
    assert "mxfp4" in allowed and "auto" in allowed
    cases = [
        ({"method": "fp4"}, f"sweep key 'method' = 'fp4' is not allowed; allowed: {allowed}"),
        ({"method": ["mxfp4"]}, "sweep key 'method' = ['mxfp4'] is not allowed; allowed: " + allowed),
        ({"extra": [{"method": "mx"}]}, "sweep key 'extra[0].method' = 'mx' is not allowed; allowed: " + allowed),
        ({"method": "mxfp4", "bits": [2]}, "sweep key 'bits' = 2 is not allowed; allowed: 4 with method='mxfp4'"),
        ({"extra": [{"method": "nvfp4"}]}, "sweep key 'group_size' = 32 is not allowed; allowed: 16 with method='nvfp4'"),
    ]
    for change, message in cases:
        with pytest.raises(SweepConfigError) as error:
            run_sweep({**BASE, **change}, tmp_path / "bad", progress=False, log=quiet)
        assert str(error.value).startswith(message), str(error.value)
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    # group_size null: each family takes its own (nvfp4 16, the integer families 32)
    config = SweepConfig.from_dict({**BASE, "group_size": None, "extra": [{"method": "nvfp4"}]})
    assert config.qat_config(4, "nvfp4").group_size == 16 and config.qat_config(4).group_size == 32


def test_a_config_without_the_key_plans_the_same_runs_and_keys_as_before():
    config = SweepConfig.from_dict(BASE)
    assert config.method == "auto" and all(grid.method == "auto" for grid in config.grids)
    assert keys(BASE) == ["s32/seed0/1280/4/0.5/fused", "s32/seed0/1280/4/0/ptq", "s32/seed0/1280/fp/0/fp"]
    # naming the family auto would choose anyway is the same run (lsq at 4 bits, seq at 2)
    assert keys({**BASE, "method": "lsq"}) == keys(BASE) == keys({**BASE, "method": "auto"})
    assert keys({**BASE, "bits": [2], "method": "seq"}) == keys({**BASE, "bits": [2]})
    assert plan_runs(SweepConfig.from_dict({**BASE, "method": "lsq"})) == plan_runs(config)
    # another family: its own keys, next to the auto ones, one FP row for both
    assert keys(MIXED) == sorted(keys(BASE) + ["s32/seed0/1280/4-mxfp4/0.5/fused", "s32/seed0/1280/4-mxfp4/0/ptq"])
    assert keys({**BASE, "bits": [2], "method": "lsq"}) == ["s32/seed0/1280/2-lsq/0.5/fused",
                                                             "s32/seed0/1280/2-lsq/0/ptq", "s32/seed0/1280/fp/0/fp"]


def test_mxfp4_rows_beside_int4_rows_in_one_folder(tmp_path):
    """An int4 sweep written before the key existed (no ``method`` in its config or rows) resumes as a
    no-op; adding an mxfp4 grid trains only its rows, from the same FP trunk, into rows that never
    collide with the int4 ones; a branched mxfp4 tail equals the same run from scratch."""
    out = tmp_path / "sweep"
    run_sweep(BASE, out, progress=False, log=quiet)
    # make the folder look like one written before the key: no "method" in the config or the rows
    saved = json.loads((out / "sweep_config.json").read_text())
    saved.pop("method")
    (out / "sweep_config.json").write_text(json.dumps(saved))
    old_rows = read_rows(out / "runs.jsonl")
    for row in old_rows:
        row.pop("method")
    (out / "runs.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in old_rows))
    trunk = sorted(os.listdir(out / "trunks" / "s32-seed0"))

    assert run_sweep(BASE, out, progress=False, log=quiet).rows_written == 0  # loads identically: nothing to do
    summary = run_sweep(MIXED, out, progress=False, log=quiet, save_models=True)
    assert summary.rows_written == 2
    assert summary.trained_tokens == 1280 // 2  # the mxfp4 tail only: the trunk checkpoint was reused
    assert sorted(os.listdir(out / "trunks" / "s32-seed0")) == trunk
    rows = {r["key"]: r for r in read_rows(out / "runs.jsonl")}
    assert sorted(rows) == keys(MIXED)
    assert [rows[k].get("method") for k in sorted(rows)] == ["mxfp4", "mxfp4", None, None, None]
    for key in ("s32/seed0/1280/4/0.5/fused", "s32/seed0/1280/4/0/ptq"):
        assert rows[key] == next(r for r in old_rows if r["key"] == key)  # untouched
    assert rows["s32/seed0/1280/4-mxfp4/0.5/fused"]["loss"] != rows["s32/seed0/1280/4/0.5/fused"]["loss"]
    assert rows["s32/seed0/1280/4-mxfp4/0/ptq"]["loss"] != rows["s32/seed0/1280/4/0/ptq"]["loss"]

    by_method = {c.method: c for c in cells(list(rows.values()))}
    assert sorted(by_method) == ["auto", "mxfp4"] and by_method["mxfp4"].label == "4-mxfp4"
    assert by_method["mxfp4"].losses == {0.0: rows["s32/seed0/1280/4-mxfp4/0/ptq"]["loss"],
                                         0.5: rows["s32/seed0/1280/4-mxfp4/0.5/fused"]["loss"]}
    assert by_method["auto"].losses[0.5] == rows["s32/seed0/1280/4/0.5/fused"]["loss"]

    config = SweepConfig.from_dict(MIXED)
    run = next(r for r in plan_runs(config) if r.key == "s32/seed0/1280/4-mxfp4/0.5/fused")
    data = load_sweep_data(config, run.total_steps * config.batch_size, cache_dir=os.path.join(out, "cache"))
    reference = train_unbranched(config, run, data)
    branched = build_model(config, run.size, run.seed)
    prepare_model_for_qat(branched, config.qat_config(run.bits, run.method))
    load_checkpoint(os.path.join(out, "models", run.key.replace("/", "_") + ".pt"), branched, None)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, branched.state_dict()[name]), name
    assert evaluate(reference, data.eval) == rows[run.key]["loss"]


def test_report_of_a_mixed_folder_separates_the_methods():
    from hf_qat.sweep.analysis import fused_minus_classic, paper_comparison, seed_noise

    rows = []
    for method, shift in ((None, 0.0), ("lsq", 0.0), ("mxfp4", 0.1)):
        for fraction, schedule in ((0.0, "ptq"), (0.25, "fused"), (0.5, "fused"), (1.0, "fused"), (0.5, "classic")):
            row = {"size": "s", "seed": 0, "budget": 1e6, "bits": 4, "num_params": 40_000, "fp_tokens": 0,
                   "qat_tokens": 1_000_000, "schedule": schedule, "fraction": fraction,
                   "loss": 3.0 + shift + fraction / 10 + (schedule == "classic") / 100}
            if method:
                row["method"] = method
            rows.append(row)
    rows = rows[:5] + rows[10:]  # an old row set (no method) and mxfp4 rows
    cell_list = cells(rows)
    assert [(c.method, c.label) for c in cell_list] == [("auto", "4"), ("mxfp4", "4-mxfp4")]
    assert sorted(paper_comparison(cell_list)) == ["4", "4-mxfp4", "all"]
    assert fused_minus_classic(rows)["4"]["pairs"] == fused_minus_classic(rows)["4-mxfp4"]["pairs"] == 1
    assert seed_noise(rows) == []  # an mxfp4 row is not the int4 row under another seed
