"""A short QAT training run ends with the same weights bit for bit on either backend."""

from __future__ import annotations

import pytest
import torch

import hf_qat
from hf_qat import QATConfig
from helpers import tiny_llama, token_dataset

pytest.importorskip("triton")

CASES = [
    dict(bits=1, group_size="channel"),
    dict(bits="ternary", group_size="tensor", activation_bits=8),
    dict(bits=2, group_size=16),
    dict(bits=4, group_size=16, embedding_bits=4),
    dict(bits=8, group_size=32, activation_bits=8),
    dict(bits=4, method="iq4_nl"),  # ggml's block families: their own forward, its passes on the engine
    dict(bits=4, method="q4_1"),
    dict(bits=2, method="q2_k", hidden=256),  # k-quants: rows of 256
]


def train(backend: str, cfg: dict, monkeypatch, steps: int = 3) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("HF_QAT_BACKEND", backend)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dict(cfg)
    model = tiny_llama(**({"hidden": cfg.pop("hidden")} if "hidden" in cfg else {})).to(device)
    hf_qat.prepare_model_for_qat(model, QATConfig(start=0, **cfg))
    hf_qat.activate_qat(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = token_dataset(n=steps * 4)
    for step in range(steps):
        batch = torch.stack([row["input_ids"] for row in data[step * 4:(step + 1) * 4]]).to(device)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c['bits']}-bit-{c.get('method', 'auto')}")
def test_triton_and_torch_runs_end_with_identical_weights(cfg, monkeypatch):
    with_torch = train("torch", cfg, monkeypatch)
    with_triton = train("triton", cfg, monkeypatch)
    assert with_torch.keys() == with_triton.keys()
    for name in with_torch:
        assert torch.equal(with_torch[name].view(torch.uint8), with_triton[name].view(torch.uint8)), name
    scales = [k for k in with_torch if k.endswith("log_scale_ratio")]
    assert scales and any(bool(with_torch[k].abs().max() > 0) for k in scales)  # they start at 0: training moved them
