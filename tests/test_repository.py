"""The README's two commands are the ones CI runs."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands() -> dict[str, str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = {}
    for label in ("main job", "tests"):
        match = re.search(rf"<!-- {label} -->\s*```(?:bash)?\n(.+?)\n```", text, re.S)
        assert match, f"README has no '<!-- {label} -->' command block"
        commands[label] = match.group(1).strip()
    return commands


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert _readme_commands()["tests"] in ci


def test_main_job_installs_then_runs_the_demo():
    command = _readme_commands()["main job"]
    assert "pip install torch==2.13.0" in command and "hf-qat demo" in command
