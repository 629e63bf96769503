"""No dead or collapsing scales at from-scratch learning rates (the case of issue 11).

A tiny Llama (hidden 64, 2 layers), 4-bit groups of 32, AdamW at a constant lr 3e-3, QAT switched on
at step 6 of 12, three seeds. With the scale itself as the Parameter, Adam's steps of about the LR
(3e-3) drove scales of about 0.007 to the 1e-5 clamp: 10.8 % of the groups ended with every
quantized weight below 5 % of the group's largest latent weight. The unit learns the log ratio to
the initial scale instead (hf_qat/model/unit.py), so a step changes a scale by about 0.3 %.
"""

from __future__ import annotations

import torch

import hf_qat
from hf_qat.training.optim import add_scale_param_group
from hf_qat.model.convert import quantizer_units
from helpers import tiny_llama, token_dataset


def collapsed_groups(model) -> tuple[int, int]:
    """Groups whose largest |quantized weight| is below 5 % of their largest |latent weight|."""
    bad = total = 0
    for _, module in quantizer_units(model):
        unit = module.weight_quantizer
        quantized = unit.layout.group_view(unit.quantized(module.weight).float()).abs().amax(-1)
        latent = unit.layout.group_view(module.weight.detach().float()).abs().amax(-1)
        bad += int((quantized < 0.05 * latent).sum())
        total += quantized.numel()
    return bad, total


def train(seed: int, steps: int = 12, switch: int = 6, lr: float = 3e-3):
    model = tiny_llama(seed=seed, hidden=64)
    hf_qat.prepare_model_for_qat(model, hf_qat.QATConfig(bits=4, group_size=32, start=switch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    assert add_scale_param_group(optimizer, model, lambda base_lr: base_lr)  # the scales at the base LR
    data = token_dataset(n=steps * 8, vocab=model.config.vocab_size, seed=seed + 1)
    for step in range(steps):
        if step == switch:
            hf_qat.activate_qat(model)
        batch = torch.stack([row["input_ids"] for row in data[step * 8:(step + 1) * 8]])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_no_group_collapses_at_a_from_scratch_learning_rate():
    bad = total = 0
    moved = []
    for seed in range(3):
        model = train(seed)
        b, t = collapsed_groups(model)
        bad, total = bad + b, total + t
        ratio = model.model.layers[0].mlp.up_proj.weight_quantizer.log_scale_ratio.detach()
        moved.append(float(ratio.abs().max()))
    assert total == 6912
    assert bad == 0, f"{bad} of {total} groups collapsed"
    assert min(moved) > 0  # the scales did learn
