"""Fused MoE experts (transformers 5) as QAT units: install, coverage, numerics in every experts
implementation, routers, the uncovered-weight error, PTQ/bake, Trainer switch and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hf_qat
from hf_qat import QATCallback, QATConfig, QATModelError
from hf_qat.model.convert import coverage, quantized_weights
from hf_qat.model.experts import QATExperts
from helpers import MOE_CONFIGS, VOCAB, make_trainer, state_dict_copy, tiny_llama, tiny_moe, token_dataset

FAMILIES = list(MOE_CONFIGS)
INPUT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def logits(model, implementation=None):
    if implementation is not None:
        model.config._experts_implementation = implementation
    with torch.no_grad():
        return model(INPUT).logits


def linear_only_fraction(model) -> float:
    """What hf_qat 0.3.0 quantized: the nn.Linear weights but the LM head, over the non-embedding weights."""
    head = model.get_output_embeddings().weight
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not head)
    total = coverage(model).total
    return linear / total


@pytest.mark.parametrize("family", FAMILIES)
def test_dormant_is_fp_bit_for_bit_and_experts_are_covered(family):
    model = tiny_moe(family)
    fp = {impl: logits(model, impl) for impl in IMPLEMENTATIONS}
    before = linear_only_fraction(model)
    params = dict(model.named_parameters())
    hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0))
    for impl in IMPLEMENTATIONS:
        assert torch.equal(logits(model, impl), fp[impl]), impl
    for name, p in model.named_parameters():  # the same Parameter objects (optimizer state, FSDP2)
        assert name.endswith("log_scale_ratio") or p is params[name], name
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QATExperts) and set(experts.weight_quantizers()) == {"gate_up_proj", "down_proj"}
    cov = coverage(model)
    assert cov.fraction >= 0.95 and before < 0.5, (cov, before)
    quantized = {name for name, _ in quantized_weights(model)}
    assert "model.layers.1.mlp.experts.down_proj" in quantized
    # routers stay in full precision and are the largest FP weights left
    assert all("gate" in name or "router" in name for name, _ in cov.largest_fp), cov.largest_fp


@pytest.mark.parametrize("family", FAMILIES)
def test_active_experts_compute_with_their_weights_on_the_grid_in_every_implementation(family):
    model = hf_qat.ptq(tiny_moe(family), QATConfig(bits=4, group_size=16, start=0))
    baked = hf_qat.remove_qat(copy.deepcopy(model), bake_weights=True)
    assert type(baked.model.layers[0].mlp.experts).__name__ == type(tiny_moe(family).model.layers[0].mlp.experts).__name__
    for impl in IMPLEMENTATIONS:  # each implementation reads the fake-quantized stacks
        assert torch.equal(logits(model, impl), logits(baked, impl)), impl
    torch.testing.assert_close(logits(model, "grouped_mm"), logits(model, "eager"), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, "batched_mm"), logits(model, "eager"), rtol=0, atol=1e-5)
    assert not torch.equal(logits(model, "eager"), logits(tiny_moe(family), "eager"))
    for name, qweight in quantized_weights(model):  # every baked weight is code * step of its group
        unit = qweight.weight_quantizer
        stored = baked.get_parameter(name if qweight.kind == "experts" else name + ".weight")
        codes, step = unit.codes(qweight.weight)
        assert set(codes.unique().tolist()) <= set(unit.spec.grid.codes), name
        matrix = codes.float() * step.repeat_interleave(codes.shape[1] // step.shape[1], 1)
        assert torch.equal(unit.view.to_matrix(stored).float(), matrix), name


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_scale_layouts_of_a_stack(family):
    model = tiny_moe(family)
    for group, shape in [(16, (4 * 32, 2)), ("channel", (4 * 32, 1)), ("tensor", (4, 1))]:
        m = hf_qat.ptq(copy.deepcopy(model), QATConfig(bits=4, group_size=group, start=0))
        experts = m.model.layers[0].mlp.experts
        unit = experts.gate_up_proj_quantizer
        assert tuple(unit.init_scale.shape) == shape, group
        # gate_up_proj holds, per expert, 32 output rows of the 32 hidden inputs, whatever the storage
        per_expert = experts.gate_up_proj.detach()
        per_expert = per_expert.transpose(-1, -2) if experts.is_transposed else per_expert  # [E, out, in]
        if group == "tensor":
            expected = per_expert.abs().amax(dim=(1, 2)).reshape(4, 1) / 7
        elif group == "channel":
            expected = per_expert.abs().amax(dim=2).reshape(-1, 1) / 7
        else:
            expected = per_expert.reshape(4, 32, 2, 16).abs().amax(-1).reshape(-1, 2) / 7
        assert torch.equal(unit.init_scale, expected), group


def test_gradients_reach_expert_weights_and_their_scales():
    model = hf_qat.ptq(tiny_moe("gpt_oss"), QATConfig(bits=4, group_size=16, start=0))
    model(INPUT, labels=INPUT).loss.backward()
    experts = model.model.layers[0].mlp.experts
    for name, unit in experts.weight_quantizers().items():
        assert getattr(experts, name).grad.abs().sum() > 0, name
        assert unit.log_scale_ratio.grad.abs().sum() > 0, name
    assert isinstance(experts._parameters["gate_up_proj"], nn.Parameter)  # put back after the forward


def test_routers_stay_fp_unless_named_and_experts_can_be_excluded_by_parameter():
    model = hf_qat.prepare_model_for_qat(tiny_moe("qwen2_moe"), QATConfig(bits=4, group_size=16, start=0))
    mlp = model.model.layers[0].mlp
    assert type(mlp.shared_expert_gate) is nn.Linear and type(mlp.gate).__name__ == "Qwen2MoeTopKRouter"
    assert type(mlp.shared_expert.up_proj) is hf_qat.QATLinear  # the shared expert is not a router

    named = hf_qat.prepare_model_for_qat(tiny_moe("qwen2_moe"), QATConfig(
        bits=4, group_size=16, start=0, target_modules=["shared_expert_gate", "mlp.experts"],
        exclude_modules=["mlp.experts.gate_up_proj"]))
    mlp = named.model.layers[0].mlp
    assert type(mlp.shared_expert_gate) is hf_qat.QATLinear and type(mlp.shared_expert.up_proj) is nn.Linear
    assert set(mlp.experts.weight_quantizers()) == {"down_proj"}
    with pytest.raises(QATModelError, match=r"names the router model\.layers\.0\.mlp\.gate, a Qwen2MoeTopKRouter"):
        hf_qat.prepare_model_for_qat(tiny_moe("qwen2_moe"), QATConfig(bits=4, start=0, target_modules=["layers.0.mlp.gate"]))


class Scaler(nn.Module):
    """A custom layer with its own 2-D weight: no hf_qat rule covers it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(width, width) * 0.1)

    def forward(self, x):
        return x @ self.mix


def test_a_weight_no_rule_covers_is_an_error_naming_it_until_excluded():
    model = tiny_llama()
    model.model.layers[0].mlp.extra = Scaler(32)
    with pytest.raises(QATModelError, match=r"model\.layers\.0\.mlp\.extra\.mix \(Scaler, shape \(32, 32\)\).*"
                                            r"exclude_modules=\['model\.layers\.0\.mlp\.extra'\]"):
        hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0))
    assert not any(True for _ in hf_qat.qat_modules(model))  # refused before anything was installed
    hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0, exclude_modules=["mlp.extra"]))
    assert ("model.layers.0.mlp.extra.mix", 1024) in coverage(model).largest_fp
    with pytest.raises(QATModelError, match=r"exclude_modules entry 'nothing_here' matches no module or parameter"):
        hf_qat.prepare_model_for_qat(tiny_llama(), QATConfig(bits=4, start=0, exclude_modules=["nothing_here"]))


def test_remove_qat_restores_the_experts_class_and_state_survives_a_reload():
    cfg = QATConfig(bits=4, group_size=16, start=0)
    model = hf_qat.ptq(tiny_moe("mixtral"), cfg)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj_quantizer.log_scale_ratio.add_(0.2)
    fresh = hf_qat.prepare_model_for_qat(tiny_moe("mixtral", seed=3), cfg)
    fresh.load_state_dict(model.state_dict())
    assert hf_qat.is_qat_active(fresh) and torch.equal(logits(fresh), logits(model))
    hf_qat.remove_qat(fresh)
    experts = fresh.model.layers[0].mlp.experts
    assert type(experts).__name__ == "MixtralExperts" and not hasattr(experts, "down_proj_quantizer")


def test_activation_bits_and_lora_on_expert_parameters_are_refused_with_the_reason():
    with pytest.raises(QATModelError, match="activation_bits is not supported on fused MoE experts"):
        hf_qat.prepare_model_for_qat(tiny_moe("qwen3_moe"), QATConfig(bits=8, group_size=16, start=0, activation_bits=8))
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_moe("qwen3_moe"), peft.LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"], lora_dropout=0.0))
    with pytest.raises(QATModelError, match=r"PEFT LoRA on the fused expert weight 'gate_up_proj'.*torch parametrization"):
        hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_trainer_switch_and_resume_after_the_switch_is_exact(tmp_path, family):
    """transformers 5.24 saves a checkpoint in the original per-expert format (Mixtral's modules renamed,
    the units' keys included) but its resume loads it with a plain load_state_dict, which would leave
    every expert at its initial value: the callback loads what it cannot place (hf_qat.training.checkpoint)."""
    cfg = QATConfig(bits=4, group_size=16, start=4, manage_schedule=False)
    full = make_trainer(tmp_path, [QATCallback(cfg)], model=tiny_moe(family), max_steps=8,
                        save_strategy="steps", save_steps=6)
    full.train()
    assert full.model.model.layers[0].mlp.experts.gate_up_proj_quantizer.is_active
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoint-6" / "model.safetensors"), "pt") as fh:
        assert not any(key.endswith("experts.gate_up_proj") for key in fh.keys())  # saved per expert
    expected = state_dict_copy(full.model)
    resumed = make_trainer(tmp_path / "resumed", [QATCallback(cfg)], model=tiny_moe(family, seed=3), max_steps=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    got = state_dict_copy(resumed.model)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert torch.equal(logits(resumed.model.eval()), logits(full.model.eval()))


def test_load_best_model_at_end_gives_the_best_checkpoints_experts_and_scales(tmp_path):
    """The Trainer reloads the best checkpoint with its own loader (no resume hook): its per-expert tensors
    and renamed units would stay those of the last step; the callback loads them."""
    cfg = QATConfig(bits=4, group_size=16, start=2, manage_schedule=False)
    from transformers import Trainer

    from helpers import training_args

    data = token_dataset(n=64)
    args = training_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                         save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                         greater_is_better=True, learning_rate=3e-2)  # "best" = the highest loss: an early checkpoint
    trainer = Trainer(model=tiny_moe("mixtral"), args=args, train_dataset=data, eval_dataset=data[:8],
                      callbacks=[QATCallback(cfg)])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")  # a checkpoint before the last step
    from hf_qat.export.api import load_qat_checkpoint

    expected = state_dict_copy(load_qat_checkpoint(best))
    got = state_dict_copy(trainer.model)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
