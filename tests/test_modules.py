"""QATLinear / QATEmbedding and the install/remove functions of hf_qat.model.convert."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_qat
from hf_qat import QATConfig, QATEmbedding, QATLinear, prepare_model_for_qat
import hf_qat.model.unit as unit_module
from hf_qat.kernels.compiled_engine import CompiledEngine, kernel as compiled_kernel
from hf_qat.model.convert import find_targets, qat_modules
from hf_qat.model.unit import WeightQuantizer
from hf_qat.quantizers import available_quantizers, get_quantizer, get_quantizer_class
from hf_qat.quantizers.reference import fake_quantize_activation
from helpers import tiny_llama

INPUT = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))


def test_dormant_model_is_bit_identical_and_keeps_parameter_objects():
    model = tiny_llama(tie=True)
    before = model(INPUT).logits
    params = {name: p for name, p in model.named_parameters()}
    prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, embedding_bits=4, start=0))
    assert torch.equal(model(INPUT).logits, before)
    for name, p in model.named_parameters():
        if not name.endswith("log_scale_ratio"):
            assert p is params[name], name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.embed_tokens, QATEmbedding) and isinstance(model.lm_head, QATLinear)


def test_default_targets_are_every_linear_but_the_head():
    model = tiny_llama(tie=False)
    targets = find_targets(model, QATConfig(start=0))
    assert "lm_head" not in targets and len(targets) == 2 * 7
    only = find_targets(model, QATConfig(start=0, target_modules=["q_proj", r"model\.layers\.1\.mlp\..*"],
                                         exclude_modules=["model.layers.1.mlp.down_proj"]))
    assert sorted(only) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj",
                            "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("cfg", [
    dict(bits=4, group_size=16), dict(bits=2, group_size="channel"), dict(bits="ternary", group_size="tensor"),
    dict(bits=1, group_size=8), dict(bits=8, group_size=32, method="absmax"),
])
def test_active_layers_compute_with_weights_on_the_grid(cfg):
    model = tiny_llama()
    prepare_model_for_qat(model, QATConfig(start=0, **cfg))
    hf_qat.activate_qat(model)
    layer = model.model.layers[0].mlp.up_proj
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.update(x=i[0], y=o))
    model(INPUT)
    handle.remove()
    codes, step = layer.weight_quantizer.codes(layer.weight)
    rows, groups = step.shape
    expanded = step.repeat_interleave(layer.weight.shape[1] // groups, dim=1).expand_as(layer.weight)
    assert set(codes.unique().tolist()) <= set(layer.weight_quantizer.spec.grid.codes)
    torch.testing.assert_close(captured["y"], captured["x"] @ (codes.float() * expanded).T, rtol=0, atol=1e-6)


def test_scales_start_from_the_family_rule_and_get_gradients():
    model = tiny_llama()
    prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0))
    layer = model.model.layers[0].self_attn.o_proj
    unit = layer.weight_quantizer
    assert not unit.is_initialized and torch.equal(unit.log_scale_ratio, torch.zeros_like(unit.log_scale_ratio))
    hf_qat.activate_qat(model)
    expected = layer.weight.detach().view(32, 2, 16).abs().amax(-1) / 7
    assert torch.equal(unit.scale(layer.weight).detach(), expected)  # init_scale * exp(0), exactly
    assert bool(unit.initialized) and bool(unit.active)
    model(INPUT, labels=INPUT).loss.backward()
    assert unit.log_scale_ratio.grad is not None and unit.log_scale_ratio.grad.abs().sum() > 0


def test_lazy_initialisation_in_a_single_process_forward():
    model = tiny_llama(tie=True)
    prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, embedding_bits=8, start=0))
    hf_qat.set_qat_active(model, True)
    model(INPUT)
    assert all(m.weight_quantizer.is_initialized for _, m in qat_modules(model))
    assert model.lm_head.weight_quantizer is model.model.embed_tokens.weight_quantizer
    unit = model.lm_head.weight_quantizer
    scale = unit.scale(model.lm_head.weight).detach().clone()
    with torch.no_grad():
        unit.log_scale_ratio.fill_(0.5)
    model.model(INPUT)  # the embedding alone runs: its tied head must not re-initialise the shared unit
    assert torch.equal(unit.scale(model.lm_head.weight).detach(), scale * torch.tensor(0.5).exp())


def test_activation_fake_quant_only_on_targeted_linears():
    model = tiny_llama()
    prepare_model_for_qat(model, QATConfig(bits=8, group_size=16, activation_bits=8, start=0))
    hf_qat.activate_qat(model)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 64)
    expected = nn.functional.linear(fake_quantize_activation(x), layer.weight_quantizer.fake_quantize(layer.weight))
    assert torch.equal(layer(x), expected)
    x.requires_grad_(True)
    layer(x).sum().backward()  # straight-through: the gradient w.r.t. x is W_q^T 1
    torch.testing.assert_close(x.grad, layer.weight_quantizer.fake_quantize(layer.weight).detach().sum(0).expand_as(x))


def test_state_survives_save_and_load_into_a_fresh_prepared_model():
    cfg = QATConfig(bits=4, group_size=16, embedding_bits=4, start=0)
    model = prepare_model_for_qat(tiny_llama(), cfg)
    hf_qat.activate_qat(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight_quantizer.log_scale_ratio.add_(0.25)
    reference = model(INPUT).logits
    fresh = prepare_model_for_qat(tiny_llama(seed=9), cfg)
    fresh.load_state_dict(model.state_dict())
    assert hf_qat.is_qat_active(fresh)
    assert all(m.weight_quantizer.is_initialized for _, m in qat_modules(fresh))
    assert torch.equal(fresh(INPUT).logits, reference)


def test_ptq_matches_activation_without_training():
    cfg = QATConfig(bits=2, group_size=16, start=0)
    a = hf_qat.ptq(tiny_llama(), cfg)
    b = prepare_model_for_qat(tiny_llama(), cfg)
    hf_qat.activate_qat(b)
    assert torch.equal(a(INPUT).logits, b(INPUT).logits)
    assert not torch.equal(a(INPUT).logits, tiny_llama()(INPUT).logits)
    assert 0 < hf_qat.quantization_error(a) < 1


def test_remove_qat_restores_plain_modules_and_can_bake_weights():
    model = tiny_llama(tie=True)
    plain = model(INPUT).logits
    cfg = QATConfig(bits=4, group_size=16, embedding_bits=4, start=0)
    prepare_model_for_qat(model, cfg)
    hf_qat.remove_qat(model)
    assert not any(True for _ in qat_modules(model)) and hf_qat.get_qat_config(model) is None
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear and torch.equal(model(INPUT).logits, plain)

    hf_qat.ptq(model, cfg)
    quantized = model(INPUT).logits
    hf_qat.remove_qat(model, bake_weights=True)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model(INPUT).logits, quantized)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_a_scaled_word_embedding_is_quantized_and_scales_its_quantized_rows(model_type):
    """Gemma's embedding multiplies the rows it looks up by sqrt(hidden): a llama.cpp file type quantizes it, so QAT
    quantizes the table and scales the fake-quantized rows; remove_qat gives the scaled class back."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16))
    source = model.model.embed_tokens
    scaled_class, scale = type(source), source.embed_scale
    assert scaled_class is not nn.Embedding and float(scale) == 8.0
    plain = model(INPUT).logits
    prepare_model_for_qat(model, QATConfig.from_preset("q4_0", start=0))
    embedding = model.model.embed_tokens
    assert isinstance(embedding, QATEmbedding) and torch.equal(model(INPUT).logits, plain)  # dormant: the same
    hf_qat.activate_qat(model)
    unit = embedding.weight_quantizer
    table = unit.quantized(embedding.weight)
    assert not torch.equal(table, embedding.weight)
    assert torch.equal(embedding(INPUT), table[INPUT] * 8.0)  # the quantized rows, then the scale
    embedding(INPUT).sum().backward()
    assert embedding.weight.grad is not None and unit.log_scale_ratio.grad is not None
    hf_qat.remove_qat(model)
    restored = model.model.embed_tokens
    assert type(restored) is scaled_class and restored.embed_scale is scale
    assert restored.scalar_embed_scale == source.scalar_embed_scale and restored.weight is source.weight
    assert "model.embed_tokens.embed_scale" not in model.state_dict()  # non-persistent, as it was
    assert torch.equal(model(INPUT).logits, plain)
    with torch.device("meta"):  # nothing to check there: refused, with what to do
        meta = AutoModelForCausalLM.from_config(model.config)
    with pytest.raises(hf_qat.QATModelError, match="is on the meta device.*once its weights are loaded"):
        prepare_model_for_qat(meta, QATConfig.from_preset("q4_0", start=0))


def test_an_embedding_with_another_forward_is_refused_naming_the_setting_and_the_way_out():
    class Shifted(nn.Embedding):
        def forward(self, input):
            return super().forward(input) + 1.0

    for config, setting in ((QATConfig(bits=4, group_size=16, embedding_bits=4, start=0), "embedding_bits is set"),
                            (QATConfig.from_preset("q8_0", start=0), "gguf_mix='q8_0' quantizes it")):
        model = tiny_llama(tie=True)
        model.model.embed_tokens = Shifted(64, 32)
        model.model.embed_tokens.weight = model.lm_head.weight
        with pytest.raises(hf_qat.QATModelError) as refused:
            prepare_model_for_qat(model, config)
        message = str(refused.value)
        assert "Shifted overrides nn.Embedding.forward" in message and setting in message
        assert "exclude_modules=['model.embed_tokens', 'lm_head']" in message


def test_calls_on_a_model_nobody_prepared_are_refused_naming_the_call():
    model = tiny_llama()
    calls = {"activate_qat": hf_qat.activate_qat, "set_qat_active": hf_qat.set_qat_active,
             "initialize_scales": hf_qat.initialize_scales, "quantization_error": hf_qat.quantization_error,
             "calibrate_importance": lambda m: hf_qat.calibrate_importance(m, [INPUT])}
    for name, call in calls.items():
        with pytest.raises(hf_qat.QATModelError, match=rf"^{name}: the model has no QAT modules; .*prepare_model_for_qat"):
            call(model)
    assert not hf_qat.is_qat_active(model)  # a question, answered


def test_preparing_again_with_another_config_names_the_fields_that_differ():
    model = prepare_model_for_qat(tiny_llama(), QATConfig(bits=4, group_size=16, start=0))
    assert prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0)) is model  # the same: a no-op
    with pytest.raises(hf_qat.QATModelError, match=r"another config; group_size: 16 there, 32 here; "
                                                   r"start: 0 there, 'auto' here\. Pass the config"):
        prepare_model_for_qat(model, QATConfig(bits=4, group_size=32, start="auto"))


def test_checkpoints_of_hf_qat_0_1_0_load_and_compute_the_same():
    """0.1.0 kept weight_scale / qat_active / qat_initialized on the layer; they load into the unit
    (the scale as init_scale, ratio 0), and the model computes the same logits."""
    cfg = QATConfig(bits=4, group_size=16, embedding_bits=4, start=0)
    model = prepare_model_for_qat(tiny_llama(), cfg)
    hf_qat.activate_qat(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight_quantizer.log_scale_ratio.add_(0.25)
    old = {}
    for key, value in model.state_dict().items():
        layer, _, leaf = key.partition(".weight_quantizer.")
        if not leaf:
            old[key] = value
        elif leaf == "log_scale_ratio":
            unit = model.get_submodule(layer).weight_quantizer
            old[f"{layer}.weight_scale"] = unit.scale(model.get_submodule(layer).weight).detach()
        elif leaf in ("active", "initialized"):
            old[f"{layer}.qat_{leaf}"] = value
    assert "model.layers.0.self_attn.q_proj.weight_scale" in old and not any("weight_quantizer" in k for k in old)
    fresh = prepare_model_for_qat(tiny_llama(seed=9), cfg)
    fresh.load_state_dict(old)
    assert hf_qat.is_qat_active(fresh)
    assert torch.equal(fresh(INPUT).logits, model(INPUT).logits)


def test_scale_init_mse_starts_from_the_least_error_clipping_and_is_checkpointed():
    from hf_qat.quantizers.reference import mse_scale

    model = tiny_llama()
    prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0, scale_init="mse"))
    hf_qat.activate_qat(model)
    layer = model.model.layers[0].mlp.down_proj
    unit = layer.weight_quantizer
    first = layer.weight.detach().view(layer.weight.shape[0], -1, 16).abs().amax(-1) / 7
    assert torch.equal(unit.scale(layer.weight).detach(), mse_scale(layer.weight, first, unit.spec))
    assert (unit.init_scale < first).any() and (unit.init_scale <= first).all()  # some groups clip
    errors = {}
    for init in ("max", "mse"):
        other = tiny_llama()
        prepare_model_for_qat(other, QATConfig(bits=4, group_size=16, start=0, scale_init=init))
        hf_qat.activate_qat(other)
        errors[init] = hf_qat.quantization_error(other)
    assert errors["mse"] < errors["max"]
    assert hf_qat.get_qat_config(model).scale_init == "mse"
    assert QATConfig.from_dict(hf_qat.get_qat_config(model).to_dict()).scale_init == "mse"


# ---------------------------------------------------------------------------------------- the backward's weight
def _layer(method: str, dtype: torch.dtype) -> QATLinear:
    model = prepare_model_for_qat(tiny_llama(), QATConfig(bits=4, method=method, start=0)).to(dtype)
    hf_qat.activate_qat(model)
    return model.model.layers[0].mlp.down_proj


def _kept_gradients(layer: QATLinear, x: torch.Tensor, rounded: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of ``x``, the weight and the scale through F.linear on kept tensors (``rounded``: the input as
    the layer rounds it, made from ``x``), then cleared."""
    unit = layer.weight_quantizer
    torch.nn.functional.linear(rounded, unit.fake_quantize(layer.weight)).backward(grad)
    tensors = (x, layer.weight, unit.log_scale_ratio)
    expected = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return expected


def _assert_gradients(layer: QATLinear, x: torch.Tensor, expected: list[torch.Tensor]) -> None:
    for got, want in zip((x.grad, layer.weight.grad, layer.weight_quantizer.log_scale_ratio.grad), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("method,dtype", [("lsq", torch.float32), ("mxfp4", torch.bfloat16)])
def test_the_backward_remakes_the_quantized_weight_with_the_same_gradients(method, dtype):
    """The fake-quantized weight is not kept from the forward (a weakref to it dies with the forward) and the
    gradients of input, weight and scale are those of F.linear on the kept weight."""
    import weakref

    layer = _layer(method, dtype)
    unit = layer.weight_quantizer
    x = torch.randn(3, 5, layer.in_features, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 5, layer.out_features, dtype=dtype)

    expected = _kept_gradients(layer, x, x, grad)

    made = []
    original = unit.fake_quantize

    def spy(weight):
        made.append(weakref.ref(out := original(weight)))
        return out

    unit.fake_quantize = spy
    out = layer(x)
    assert made and made[0]() is None  # nothing holds the quantized weight between forward and backward
    out.backward(grad)
    _assert_gradients(layer, x, expected)


def test_the_backward_remakes_the_int8_input_of_a8w4_with_the_same_gradients():
    """With activation_bits=8 the int8-rounded input is not kept either (q/k/v would each hold a copy of their
    shared input): the gradients are those of F.linear on the kept rounded input and weight, and an input
    changed in place before the backward is refused."""
    import weakref

    from hf_qat.kernels import activation_fake_quant
    from hf_qat.model import modules

    model = prepare_model_for_qat(tiny_llama(), QATConfig.from_preset("a8w4", start=0))
    hf_qat.activate_qat(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    grad = torch.randn(3, 5, layer.out_features)
    expected = _kept_gradients(layer, x, activation_fake_quant(x), grad)

    made = []
    original = modules.activation_fake_quant

    def spy(tensor):
        out = original(tensor)
        if tensor.requires_grad:  # the forward's, not the backward's remake
            made.append(weakref.ref(out))
        return out

    modules.activation_fake_quant = spy
    try:
        out = layer(x)
        assert made and made[0]() is None  # nothing holds the rounded input between forward and backward
        out.backward(grad)
    finally:
        modules.activation_fake_quant = original
    _assert_gradients(layer, x, expected)
    with torch.inference_mode():  # an inference tensor has no version to check: its rounded copy is kept
        frozen = torch.randn(4, layer.in_features)
    layer(frozen).sum().backward()
    source = torch.randn(4, layer.in_features).requires_grad_()
    y = source * 1.0
    out = layer(y)
    with torch.no_grad():
        y.mul_(2.0)
    with pytest.raises(hf_qat.QATRuntimeError, match="activation_bits was modified in place"):
        out.sum().backward()


def test_a_weight_changed_between_forward_and_backward_is_an_error_and_checkpointing_keeps_its_hooks():
    layer = _layer("lsq", torch.float32)
    x = torch.randn(4, layer.in_features, requires_grad=True)
    out = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    with pytest.raises(hf_qat.QATRuntimeError, match="modified in place between the forward and the backward"):
        out.sum().backward()  # the input's gradient needs the quantized weight: remade, refused
    # under another saved-tensor hook (activation checkpointing), the layer steps aside: theirs apply
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.shape) or t, lambda t: t):
        layer(x).sum().backward()
    assert torch.Size([layer.out_features, layer.in_features]) in [torch.Size(s) for s in seen] or \
        torch.Size([layer.in_features, layer.out_features]) in [torch.Size(s) for s in seen]


# Embeddings of each kind of family: (config, whether a row's quantized values depend on its own row alone).
EMBEDDING_FORMATS = {
    "lsq g16": (dict(bits=4, group_size=16, embedding_bits=4), True),
    "absmax channel": (dict(bits=4, group_size="channel", embedding_bits=8, embedding_method="absmax"), True),
    "absmax tensor": (dict(bits=4, group_size="tensor", embedding_bits=8, embedding_method="absmax"), False),
    "mxfp4": (dict(bits=4, method="mxfp4", embedding_bits=4, embedding_method="mxfp4"), True),
    "nvfp4": (dict(bits=4, method="nvfp4", embedding_bits=4, embedding_method="nvfp4"), False),
    "q4_k_m file": (dict(preset="q4_k_m"), True),
    "iq4_nl file": (dict(preset="iq4_nl"), True),
}
needs_compiled = pytest.mark.skipif(CompiledEngine().refusal(torch.zeros(1)) is not None,
                                    reason="the compiled engine needs a C++ compiler and torch >= 2.13")


def _spy_on_fake_quant(monkeypatch) -> list[int]:
    """The number of rows of every weight the units fake-quantize from now on."""
    seen, original = [], unit_module.weight_fake_quant

    def spy(weight, *args, **kwargs):
        seen.append(weight.shape[0])
        return original(weight, *args, **kwargs)

    monkeypatch.setattr(unit_module, "weight_fake_quant", spy)
    return seen


@pytest.mark.parametrize("name,backend", [(name, "torch") for name in EMBEDDING_FORMATS]
                         + [pytest.param(name, "compiled", marks=needs_compiled) for name in ("q4_k_m file", "mxfp4")])
def test_an_embedding_quantizes_only_the_rows_it_looks_up_with_the_same_values_and_gradients(name, backend,
                                                                                              monkeypatch):
    """An active QATEmbedding returns the rows of its fully fake-quantized table, bit for bit, and passes the
    gradients of the table's lookup to the weight (exactly) and the scales (up to the order of a sum over repeated
    tokens), padding_idx and scale_grad_by_freq included; where a row depends on its own scales alone, the fake
    quantization sees only the batch's rows, never the table (on the compiled engine: uncompiled, no kernel per
    batch shape), and the whole table again once a batch holds as many tokens as the table has rows."""
    fields, rows_alone = EMBEDDING_FORMATS[name]
    monkeypatch.setenv("HF_QAT_BACKEND", backend)
    model = tiny_llama(tie=False, hidden=256, vocab=96)
    fields = dict(fields)
    preset = fields.pop("preset", None)
    cfg = QATConfig.from_preset(preset, start=0) if preset else QATConfig(start=0, **fields)
    prepare_model_for_qat(model, cfg)
    hf_qat.activate_qat(model)
    embedding = model.model.embed_tokens
    embedding.padding_idx, embedding.scale_grad_by_freq = 3, True
    unit = embedding.weight_quantizer
    assert isinstance(embedding, QATEmbedding) and unit.rows_independent == rows_alone
    with torch.no_grad():
        embedding.weight.mul_(torch.linspace(0.5, 2.0, 96).unsqueeze(1))  # rows of different ranges
    ids = torch.tensor([[5, 3, 7, 7, 90], [7, 0, 3, 41, 5]])
    grad = torch.randn(2, 5, 256)
    unit.fake_quantize(embedding.weight)  # initialises the scales
    learned = [embedding.weight] + ([unit.log_scale_ratio] if unit.log_scale_ratio is not None else [])

    table = unit.fake_quantize(embedding.weight)
    torch.nn.functional.embedding(ids, table, 3, None, 2.0, True).backward(grad)
    expected = [t.grad.clone() for t in learned]
    for t in learned:
        t.grad = None

    kernels = compiled_kernel.cache_info().currsize
    seen = _spy_on_fake_quant(monkeypatch)
    out = embedding(ids)
    assert torch.equal(out, torch.nn.functional.embedding(ids, unit.quantized(embedding.weight)))
    assert seen == ([ids.numel()] if rows_alone else [96])
    out.backward(grad)
    assert compiled_kernel.cache_info().currsize == kernels
    assert torch.equal(embedding.weight.grad, expected[0])
    assert embedding.weight.grad[3].abs().sum() == 0 and embedding.weight.grad[7].abs().sum() > 0
    if len(learned) > 1:
        torch.testing.assert_close(unit.log_scale_ratio.grad, expected[1], rtol=1e-5, atol=1e-9)
        assert unit.log_scale_ratio.grad[7].abs().sum() > 0

    seen.clear()
    many = torch.arange(96).repeat(2)
    assert torch.equal(embedding(many), unit.quantized(embedding.weight)[many])
    assert seen == [96]


def _family_cases():
    """Every registered family at its first bit width, on an embedding 512 wide (two k-quant super-blocks a row)."""
    for family in available_quantizers():
        cls = get_quantizer_class(family)
        group = cls.block_size or 32
        yield pytest.param(family, cls.supported_bits[0], group, id=family)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family,bits,group", list(_family_cases()))
def test_every_family_quantizes_looked_up_rows_as_the_rows_of_its_table(family, bits, group, dtype, monkeypatch):
    """For every family, from the lazy first forward on: the looked-up rows equal the rows of the whole table on its
    grid (NVFP4, whose tensor scale couples the rows, quantizes the table), the weight gradient is the whole-table
    path's, and a batch of no tokens gives no rows."""
    monkeypatch.setenv("HF_QAT_BACKEND", "torch")
    torch.manual_seed(0)
    table = nn.Embedding(40, 512, dtype=dtype)
    with torch.no_grad():
        table.weight.mul_(torch.linspace(0.25, 4.0, 40, dtype=dtype).unsqueeze(1))
    unit = WeightQuantizer(get_quantizer(family, bits), table.weight, group_size=group, scale_dtype="float32",
                           scale_grad_mode="paretoq", name="embed_tokens")
    embedding = QATEmbedding.from_embedding(table, unit)
    unit.set_active(True)
    ids = torch.tensor([[1, 9, 9, 30], [0, 39, 1, 9]])
    seen = _spy_on_fake_quant(monkeypatch)
    out = embedding(ids)  # initialises the scales from the whole table
    assert unit.is_initialized and seen == [ids.numel() if unit.rows_independent else 40]
    assert unit.rows_independent == (family != "nvfp4")
    assert torch.equal(out, unit.quantized(table.weight)[ids])
    grad = torch.randn_like(out)
    out.backward(grad)
    got = table.weight.grad.clone()
    table.weight.grad = None
    torch.nn.functional.embedding(ids, unit.fake_quantize(table.weight)).backward(grad)
    assert torch.equal(got, table.weight.grad)
    assert embedding(ids[:, :0]).shape == (2, 0, 512)
