"""Scale initialisation that takes more than a few seconds (scale_init="mse" on a large model) shows a
progress bar; quick initialisation shows none."""

from __future__ import annotations

import time

import hf_qat
from hf_qat import QATConfig
from hf_qat.model import convert
from hf_qat.model.unit import WeightQuantizer
from helpers import tiny_llama

BAR = "hf_qat: initialising the scales"


def test_slow_initialisation_shows_progress(monkeypatch, capsys):
    initialize = WeightQuantizer.initialize

    def slow(self, weight):
        time.sleep(0.05)
        initialize(self, weight)

    monkeypatch.setattr(WeightQuantizer, "initialize", slow)
    monkeypatch.setattr(convert, "PROGRESS_DELAY", 0.2)  # 14 weights x 0.05 s run past it
    hf_qat.ptq(tiny_llama(), QATConfig(start=0, group_size=16, scale_init="mse"))
    err = capsys.readouterr().err
    assert BAR in err and "14/14" in err


def test_quick_initialisation_shows_none(monkeypatch, capsys):
    monkeypatch.setattr(convert, "PROGRESS_DELAY", 2.0)  # a tiny model's scales take milliseconds
    model = hf_qat.ptq(tiny_llama(), QATConfig(start=0, group_size=16, scale_init="mse"))
    assert BAR not in capsys.readouterr().err
    assert all(w.weight_quantizer.is_initialized for _, w in hf_qat.model.convert.quantizer_units(model))
