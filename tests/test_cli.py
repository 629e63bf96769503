"""The hf-qat command line: plan, fit, best-bits (export and demo have their own tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hf_qat.cli import main
from hf_qat.counts import human, parse_bytes, parse_count

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "planner"))
from test_law import synthetic_runs  # noqa: E402


def assert_png(path, min_bytes=8_000):
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > min_bytes
    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 300
    assert float(np.std(pixels[..., :3])) > 0.05  # not a blank image


def test_units():
    assert parse_count("135M") == 135e6 and parse_count("10B") == 1e10 and parse_count("2T") == 2e12
    assert parse_count("1e9") == 1e9 and parse_bytes("1GB") == 1e9 and parse_bytes("512MiB") == 2**29
    assert human(2.6e9) == "2.6B"
    with pytest.raises(ValueError, match="not a count"):
        parse_count("ten")
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("1 parsec")


def test_plan_prints_the_table_and_writes_a_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert main(["plan", "--params", "135M", "--tokens", "10B", "--bits", "4", "--steps", "20000", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "S = 148.1" in out and "0.260" in out and "14797 / 20000" in out
    for baseline in ("ParetoQ 10%", "half (torchtune)", "QAT from start", "PTQ"):
        assert baseline in out
    assert_png(png)


def test_plan_json_and_pretrained_tokens(capsys):
    assert main(["plan", "--params", "135M", "--tokens", "1B", "--bits", "2", "--steps", "1000",
                 "--pretrained-tokens", "2T", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["switch_step"] == 0 and plan["d_total"] == pytest.approx(2.001e12)
    assert plan["optimal_qat_tokens"] > 1e9 and plan["warnings"]


def test_plan_of_a_mixture_of_experts_states_both_parameter_counts(capsys):
    assert main(["plan", "--params", "30B", "--active-params", "3B", "--tokens", "1T", "--bits", "4", "--json"]) == 0
    total = json.loads(capsys.readouterr().out)
    assert main(["plan", "--params", "30B", "--active-params", "3B", "--tokens", "1T", "--bits", "4", "--json",
                 "--moe-params", "active"]) == 0
    active = json.loads(capsys.readouterr().out)
    assert total["num_params"] == active["num_params"] == 30e9 and total["active_params"] == 3e9
    assert active["tokens_per_param_byte"] == pytest.approx(10 * total["tokens_per_param_byte"])
    assert main(["plan", "--params", "30B", "--active-params", "3B", "--tokens", "1T", "--bits", "4"]) == 0
    assert "30B parameters (3B active; S counts the total)" in capsys.readouterr().out.replace("\n", " ")


def test_fit_then_plan_with_the_law_and_best_bits(tmp_path, capsys):
    _, runs = synthetic_runs()
    csv = tmp_path / "runs.csv"
    lines = ["num_params,fp_tokens,qat_tokens,bits,loss"] + [
        f"{r['num_params']},{r['fp_tokens']},{r['qat_tokens']},{'' if r['bits'] is None else r['bits']},{r['loss']}"
        for r in runs
    ]
    csv.write_text("\n".join(lines) + "\n")
    law_path, fit_png, plan_png = tmp_path / "law.json", tmp_path / "fit.png", tmp_path / "plan.png"
    assert main(["fit", str(csv), "-o", str(law_path), "--plot", str(fit_png), "--starts", "8"]) == 0
    out = capsys.readouterr().out
    assert "runs fitted" in out and law_path.is_file()
    assert_png(fit_png)
    assert main(["plan", "--params", "100M", "--tokens", "10B", "--bits", "4", "--steps", "1000",
                 "--law", str(law_path), "--plot", str(plan_png)]) == 0
    out = capsys.readouterr().out
    assert "planner (law)" in out
    assert_png(plan_png)
    assert main(["best-bits", "--memory", "50MB", "--tokens", "20B", "--law", str(law_path),
                 "--candidates", "1,2,4,8"]) == 0
    out = capsys.readouterr().out
    assert "best bit width" in out and "ternary" not in out


def test_bad_arguments_fail_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--params", "lots", "--tokens", "10B", "--bits", "4"])
    assert "not a count" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--params", "1M", "--tokens", "10B", "--bits", "7"])
    assert "QATConfig.bits='7'" in capsys.readouterr().err
    assert main(["best-bits", "--memory", "1GB", "--tokens", "1B", "--law", str(tmp_path / "missing.json")]) == 2
    assert "error" in capsys.readouterr().out


def test_an_error_message_is_printed_as_written(monkeypatch, capsys):
    """Brackets in a message ("pip install 'hf_qat[export]'", a list of names) are not taken for rich's markup."""
    import hf_qat.cli

    def fails(args):
        raise ImportError("needs the gguf package (pip install 'hf_qat[export]'); modes: ['a', 'b'] [bold]x[/bold]")

    monkeypatch.setattr(hf_qat.cli, "cmd_demo", fails)
    assert main(["demo"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "(pip install 'hf_qat[export]'); modes: ['a', 'b'] [bold]x[/bold]" in out


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "hf_qat.cli", "plan", "--params", "86M", "--tokens", "2.3e9",
                           "--bits", "6"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "0.152" in proc.stdout


def test_export_command_writes_a_checkpoint_from_a_run_directory(tmp_path, capsys):
    from hf_qat import QATCallback, QATConfig
    from hf_qat.export import load_exported
    from helpers import make_trainer

    trainer = make_trainer(tmp_path / "run", [QATCallback(QATConfig(bits=4, group_size=16, start=3))], max_steps=6,
                           save_strategy="steps", save_steps=6)
    trainer.train()
    assert main(["export", str(tmp_path / "run" / "checkpoint-6"), str(tmp_path / "out"), "--format", "compressed-tensors"]) == 0
    assert "exported compressed-tensors" in capsys.readouterr().out
    assert load_exported(tmp_path / "out") is not None
    assert main(["export", str(tmp_path / "run" / "checkpoint-6"), str(tmp_path / "bad"), "--format", "gguf"]) == 2
    assert "cannot represent" in capsys.readouterr().out
    # a format option the format does not take, a value it does not allow, a malformed one: exit 2, nothing written
    for option, message in (("ternary_type=TQ1_0", "not an option of format 'compressed-tensors'"),
                            ("nonsense", "KEY=VALUE")):
        code = main(["export", str(tmp_path / "run" / "checkpoint-6"), str(tmp_path / "opt"), "--format",
                     "compressed-tensors", "--format-option", option])
        assert code == 2 and message in " ".join(capsys.readouterr().out.split())  # rich wraps lines
        assert not (tmp_path / "opt").exists()
