import pytest

from hf_qat.planner import BASELINES, ILLUSTRATIVE_PARAMS, QATScalingLaw, plan_qat

TRUE = ILLUSTRATIVE_PARAMS


def test_plan_fields_and_switch_step():
    plan = plan_qat(num_params=135e6, total_tokens=10e9, bits=4, total_steps=20_000)
    assert plan.tokens_per_param_byte == pytest.approx(10e9 / (135e6 * 0.5))
    assert plan.qat_tokens == pytest.approx(plan.qat_fraction * 10e9)
    assert plan.fp_tokens + plan.qat_tokens == pytest.approx(10e9)
    assert plan.switch_step == round((1 - plan.qat_fraction) * 20_000)
    assert plan.tokens_per_step == pytest.approx(5e5) and plan.warnings == []
    assert set(plan.baselines) == set(BASELINES)
    assert plan.baselines["paretoq_10pct"]["switch_step"] == 18_000
    assert plan.baselines["switch_at_half"]["switch_step"] == 10_000
    assert plan.baselines["qat_from_start"]["switch_step"] == 0
    assert plan_qat(135e6, 10e9, 4, tokens_per_step=1e6).total_steps == 10_000
    assert plan_qat(135e6, 10e9, 4, total_steps=20_000, tokens_per_step=5e5).switch_step == plan.switch_step
    with pytest.raises(ValueError, match=r"20000 x 1000 = 2e\+07 tokens, but total_tokens is 1e\+10"):
        plan_qat(135e6, 10e9, 4, total_steps=20_000, tokens_per_step=1000)


def test_pretrained_tokens_count_as_fp_tokens():
    plan = plan_qat(num_params=135e6, total_tokens=50e9, bits=4, total_steps=5000, pretrained_tokens=50e9)
    assert plan.d_total == pytest.approx(100e9)
    assert plan.optimal_qat_tokens == pytest.approx(plan.qat_fraction * 100e9)
    assert plan.qat_tokens == pytest.approx(plan.optimal_qat_tokens)
    assert plan.run_qat_fraction == pytest.approx(plan.qat_tokens / 50e9)
    assert plan.switch_step == round((1 - plan.run_qat_fraction) * 5000)
    # A short finetune of a long-pretrained model: QAT from step 0, and the plan says what it wanted.
    short = plan_qat(num_params=135e6, total_tokens=1e9, bits=4, total_steps=1000, pretrained_tokens=2e12)
    assert short.switch_step == 0 and short.qat_tokens == 1e9
    assert short.optimal_qat_tokens > 1e9 and any("QAT starts at step 0" in w for w in short.warnings)


def test_outside_the_fitted_range_warns_but_answers():
    plan = plan_qat(num_params=1e6, total_tokens=2e6, bits=4, total_steps=100)
    assert plan.warnings and "extrapolation" in plan.warnings[0]
    assert 0 <= plan.qat_fraction < 1 and plan.switch_step == 99  # at least one QAT step
    # fewer QAT tokens than one step: the plan reports the one step the run takes, the optimum beside it
    short = plan_qat(num_params=1e6, total_tokens=2e6, bits=4, total_steps=3)
    assert short.switch_step == 2 and short.optimal_qat_tokens == pytest.approx(short.qat_fraction * 2e6)
    assert short.run_qat_fraction == pytest.approx(1 / 3) and short.qat_tokens == pytest.approx(2e6 / 3)
    assert short.fp_tokens + short.qat_tokens == pytest.approx(2e6)
    assert "QAT on 33.3% of the run" in short.summary()


def test_law_strategy_and_predicted_losses():
    law = QATScalingLaw(TRUE)
    plan = plan_qat(1e8, 1e10, 4, total_steps=1000, law=law, strategy="law")
    assert plan.qat_fraction == pytest.approx(law.optimal_fraction(1e8, 1e10, 4))
    assert plan.predicted_loss == pytest.approx(law.predict(1e8, plan.fp_tokens, plan.qat_tokens, 4))
    for row in plan.baselines.values():
        assert row["predicted_loss"] >= plan.predicted_loss - 1e-12
    paper = plan_qat(1e8, 1e10, 4, total_steps=1000, law=law)
    assert paper.predicted_loss is not None and paper.strategy == "paper"


def test_fixed_strategy_and_errors():
    plan = plan_qat(1e8, 1e10, 2, total_steps=100, strategy="fixed", fraction=0.3)
    assert plan.switch_step == 70 and plan.run_qat_fraction == pytest.approx(0.3)
    with pytest.raises(ValueError, match="strategy='law' needs a fitted law"):
        plan_qat(1e8, 1e10, 2, strategy="law")
    with pytest.raises(ValueError, match="strategy='magic'"):
        plan_qat(1e8, 1e10, 2, strategy="magic")
    with pytest.raises(ValueError, match="num_params"):
        plan_qat(0, 1e10, 2)
    with pytest.raises(ValueError, match="bits"):
        plan_qat(1e8, 1e10, 7)


def test_moe_plans_state_total_and_active_parameters_and_s_uses_the_chosen_one():
    from hf_qat.planner import optimal_qat_fraction, tokens_per_parameter_byte

    total = plan_qat(30e9, 1e12, 4, active_params=3e9)
    active = plan_qat(30e9, 1e12, 4, active_params=3e9, moe_params="active")
    assert total.num_params == active.num_params == 30e9 and total.active_params == active.active_params == 3e9
    assert total.tokens_per_param_byte == pytest.approx(tokens_per_parameter_byte(30e9, 1e12, 4))
    assert active.tokens_per_param_byte == pytest.approx(tokens_per_parameter_byte(3e9, 1e12, 4))
    assert active.qat_fraction == pytest.approx(optimal_qat_fraction(active.tokens_per_param_byte))
    assert "3e+09 active" in active.summary() and active.to_dict()["moe_params"] == "active"
    with pytest.raises(ValueError, match="needs active_params"):
        plan_qat(30e9, 1e12, 4, moe_params="active")
    with pytest.raises(ValueError, match="active_params must be in"):
        plan_qat(30e9, 1e12, 4, active_params=40e9)


def test_active_parameters_of_a_tiny_qwen3_moe():
    import transformers

    from hf_qat.training.run_inputs import active_parameters, count_parameters

    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=8, num_experts_per_tok=2, head_dim=8)
    model = transformers.Qwen3MoeForCausalLM(config)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts == 2 * 8 * (32 * 32 + 32 * 16)
    assert active_parameters(model) == count_parameters(model) - experts * 6 // 8
    import hf_qat

    hf_qat.prepare_model_for_qat(model, hf_qat.QATConfig(bits=4, group_size=8, start=0))
    quantized = count_parameters(model, quantized_only=True)
    assert quantized == experts + 2 * (32 * 32 * 2 + 16 * 32 * 2)  # experts and attention, no router
    assert active_parameters(model, quantized_only=True) == quantized - experts * 6 // 8
    assert active_parameters(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))) is None
