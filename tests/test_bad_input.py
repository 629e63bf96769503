"""Bad configurations and situations: each gets a clear error that names the problem."""

from __future__ import annotations

import math

import pytest
import torch

from hf_qat import (
    QATCallback,
    QATConfig,
    QATConfigError,
    QATModelError,
    QATRuntimeError,
    activate_qat,
    prepare_model_for_qat,
)
from helpers import make_trainer, tiny_llama

# (config kwargs, exception, regex the message must match)
BAD_CONFIGS = [
    ({"bits": 0}, QATConfigError, r"bits=0 .*allowed: 1, 1.58"),
    ({"bits": 7}, QATConfigError, r"bits=7 .*allowed"),
    ({"bits": 7, "method": "seq"}, QATConfigError, r"bits=7"),
    ({"bits": 0, "method": "seq"}, QATConfigError, r"bits=0"),
    ({"bits": 4, "method": "seq"}, QATConfigError, r"bits=4 .*1.58|ternary.*method='seq'"),
    ({"bits": 2, "method": "binary"}, QATConfigError, r"bits=2 .*method='binary'"),
    ({"bits": 1, "method": "lsq"}, QATConfigError, r"bits=1 .*method='lsq'"),
    ({"bits": True}, QATConfigError, r"bits=True"),
    ({"method": "gptq"}, QATConfigError, r"method='gptq' .*auto, lsq, seq, binary, absmax"),
    ({"group_size": 0}, QATConfigError, r"group_size=0 .*power of two"),
    ({"group_size": 48}, QATConfigError, r"group_size=48 .*power of two"),
    ({"group_size": "row"}, QATConfigError, r"group_size='row' .*'channel' or 'tensor'"),
    ({"start": -1}, QATConfigError, r"start=-1 .*int step >= 0"),
    ({"start": 1.5}, QATConfigError, r"start=1.5 .*fraction in \(0, 1\]"),
    ({"start": 0.0}, QATConfigError, r"start=0.0 .*fraction in \(0, 1\]. a QAT fraction of 0.0 means no QAT"),
    ({"law_path": ""}, QATConfigError, r"law_path='' .*fitted law JSON"),
    ({"group_size": "²"}, QATConfigError, r"group_size='²' .*power of two"),
    ({"start": math.nan}, QATConfigError, r"start=nan"),
    ({"start": "soon"}, QATConfigError, r"start='soon'"),
    ({"start": True}, QATConfigError, r"start=True"),
    ({"embedding_bits": 2}, QATConfigError, r"embedding_bits=2 .*no fewer than 4 bits"),
    ({"embedding_bits": 3}, QATConfigError, r"embedding_bits=3 .*embedding_method='auto'"),
    ({"activation_bits": 4}, QATConfigError, r"activation_bits=4 .*None or 8"),
    ({"scale_dtype": "int8"}, QATConfigError, r"scale_dtype='int8' .*float16, bfloat16, float32"),
    ({"pretrained_tokens": -5}, QATConfigError, r"pretrained_tokens=-5"),
    ({"scale_lr_multiplier": 0}, QATConfigError, r"scale_lr_multiplier=0"),
    ({"target_modules": []}, QATConfigError, r"target_modules=\[\]"),
    ({"target_modules": [3]}, QATConfigError, r"target_modules=\[3\]"),
    ({"scale_grad_mode": "adam"}, QATConfigError, r"scale_grad_mode='adam' .*paretoq, lsq"),
    ({"decay_shape": "step"}, QATConfigError, r"decay_shape='step' .*linear, cosine, 1-sqrt"),
    ({"fuse_cooldown": "yes"}, QATConfigError, r"fuse_cooldown='yes' .*True or False"),
    ({"min_lr_ratio": 2.0}, QATConfigError, r"min_lr_ratio=2.0"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS])
def test_invalid_config_is_refused_with_the_field_named(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        QATConfig(**kwargs)
    assert info.value.field == next(iter(kwargs))


FUZZ_VALUES = [None, True, False, 0, -1, 1, 2, 3, 4, 7, 8, 16, 32, 48, 1.58, 0.0, 0.5, 1.0, 1.5, -0.1, math.nan, math.inf,
               10 ** 30, "auto", "ternary", "channel", "tensor", "", "x", "4", "32", "²", "float16", "bfloat16", "law",
               "paper", "merged", "base", "mse", "max", "lsq", "seq", "absmax", "2T", "1e99", "cosine", "q4_k", "q4_k_m", "mxfp4", [], ["q_proj"],
               [3], ["("], {}, {"teacher": "initial"}, {"teacher": "nn.Module"}, {"weight": 2}, {"bogus": 1}, {1: 2},
               {"top_k": 0}, (1, 2), object(), b"bytes"]


def test_from_dict_fuzz_gives_a_valid_config_or_an_error_naming_a_field(tmp_path):
    """Random keys and values: QATConfig.from_dict either builds a config that round-trips through
    to_dict, or raises QATConfigError naming a field; never another exception."""
    import dataclasses
    import random

    law = tmp_path / "law.json"
    law.write_text("{}")
    fields = [f.name for f in dataclasses.fields(QATConfig)]
    values = FUZZ_VALUES + [str(law)]
    rng = random.Random(0)
    built = 0
    for _ in range(3000):
        data = {rng.choice(fields + ["bogus", 3]): rng.choice(values) for _ in range(rng.randint(1, 4))}
        try:
            config = QATConfig.from_dict(data)
        except QATConfigError as exc:
            assert exc.field.split(".")[0] in set(fields) | {str(k) for k in data}, (data, exc.field)
        else:
            built += 1
            assert QATConfig.from_dict(config.to_dict()).to_dict() == config.to_dict(), data
    assert built > 50  # the fuzzing reaches valid configs too


def test_unknown_field_in_dict():
    with pytest.raises(QATConfigError, match=r"QATConfig.bitz=4 .*a QATConfig field: .*bits"):
        QATConfig.from_dict({"bitz": 4})


def test_unknown_preset():
    with pytest.raises(QATConfigError, match=r"preset='w3' .*w4g32"):
        QATConfig.from_preset("w3")


def test_group_size_that_does_not_divide_a_layer():
    model = tiny_llama(hidden=48)  # q_proj in_features 48: 32 does not divide it
    with pytest.raises(QATConfigError, match=r"group_size=32 .*divides .*input width 48 \(2, 4, 8, 16\)"):
        prepare_model_for_qat(model, QATConfig(group_size=32, start=0))


def test_target_module_that_matches_nothing():
    with pytest.raises(QATModelError, match=r"target_modules entry 'qproj' matches no quantizable weight.*q_proj"):
        prepare_model_for_qat(tiny_llama(), QATConfig(target_modules=["qproj"], start=0))


def test_exclude_module_that_matches_nothing():
    with pytest.raises(QATModelError, match=r"exclude_modules entry 'mlp.gate' matches no module or parameter"):
        prepare_model_for_qat(tiny_llama(), QATConfig(exclude_modules=["mlp.gate"], start=0))


def test_excluding_everything_leaves_nothing_to_quantize():
    with pytest.raises(QATModelError, match="selects no layer"):
        prepare_model_for_qat(tiny_llama(), QATConfig(exclude_modules=[r".*"], start=0))


def test_tied_head_in_target_modules():
    with pytest.raises(QATModelError, match="tied"):
        prepare_model_for_qat(tiny_llama(tie=True), QATConfig(target_modules=["lm_head"], start=0))


def test_head_both_targeted_and_embedding_bits():
    with pytest.raises(QATModelError, match="embedding_bits"):
        prepare_model_for_qat(tiny_llama(tie=False), QATConfig(target_modules=["lm_head", "q_proj"], embedding_bits=4))


@pytest.mark.parametrize("uncovered", [False, True])
def test_an_embedding_hf_qat_cannot_quantize_is_named_before_any_uncovered_weight(uncovered):
    """embedding_bits on an embedding with max_norm, or on a model without embeddings: the embedding's own
    reason, also where another weight no rule covers would be refused (its refusal is the general one)."""
    def model(**embedding):
        m = tiny_llama()
        if uncovered:
            m.model.extra = torch.nn.Conv1d(4, 4, 1)
        for key, value in embedding.items():
            setattr(m.model.embed_tokens, key, value)
        return m

    with pytest.raises(QATModelError, match="max_norm or sparse gradients"):
        prepare_model_for_qat(model(max_norm=1.0), QATConfig(embedding_bits=8, start=0))
    no_embeddings = model()
    no_embeddings.get_input_embeddings = no_embeddings.get_output_embeddings = lambda: None
    no_embeddings.lm_head = torch.nn.Identity()
    with pytest.raises(QATModelError, match="exposes no input or output embedding"):
        prepare_model_for_qat(no_embeddings, QATConfig(embedding_bits=8, start=0))
    if uncovered:  # without embedding_bits the extra weight is what is refused
        with pytest.raises(QATModelError, match=r"model\.extra\.weight .*no rule to quantize"):
            prepare_model_for_qat(model(), QATConfig(start=0))


def test_preparing_again_with_another_config():
    model = prepare_model_for_qat(tiny_llama(), QATConfig(bits=4, start=0))
    assert prepare_model_for_qat(model, QATConfig(bits=4, start=0)) is model  # same config: no-op
    with pytest.raises(QATModelError, match="already holds QAT modules"):
        prepare_model_for_qat(model, QATConfig(bits=2, start=0))


def test_nan_weights_at_the_switch():
    model = prepare_model_for_qat(tiny_llama(), QATConfig(bits=4, group_size=16, start=0))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(QATRuntimeError, match=r"model.layers.1.mlp.up_proj: the weight holds 1 NaN/Inf values at the QAT switch"):
        activate_qat(model)


def test_start_at_or_after_the_end_of_training(tmp_path):
    trainer = make_trainer(tmp_path, [QATCallback(bits=4, group_size=16, start=20)], max_steps=20)
    with pytest.raises(QATConfigError, match=r"start=20 .*below max_steps=20"):
        trainer.train()


def test_a_law_file_that_does_not_exist_is_refused_when_the_callback_is_built(tmp_path):
    """A run that plans with a law needs the file; a saved config that names a law file gone since
    still reads back (exporting its checkpoint needs no law)."""
    missing = str(tmp_path / "law.json")
    with pytest.raises(QATConfigError, match=r"law_path=.*existing fitted law") as info:
        QATCallback(bits=4, strategy="law", law_path=missing)
    assert info.value.field == "law_path"
    QATConfig(bits=4, strategy="law", law_path=missing).save_pretrained(tmp_path / "saved")
    assert QATConfig.from_pretrained(tmp_path / "saved").law_path == missing


def test_zero_fraction_is_refused_when_the_config_is_built():
    with pytest.raises(QATConfigError, match="0.0 means no QAT") as info:
        QATCallback(bits=4, group_size=16, start=0.0)
    assert info.value.field == "start"


def test_callback_added_after_the_trainer_was_built(tmp_path):
    trainer = make_trainer(tmp_path, [], max_steps=5)
    trainer.add_callback(QATCallback(bits=4, group_size=16, start=2))
    with pytest.raises(QATRuntimeError, match=r"pass QATCallback to the Trainer's constructor"):
        trainer.train()


def test_callback_with_a_wrong_config_type():
    with pytest.raises(TypeError, match="QATConfig, a dict or a path"):
        QATCallback(config=42)


def test_backend_override_must_be_known(monkeypatch):
    from hf_qat.kernels import select_engine

    monkeypatch.setenv("HF_QAT_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"HF_QAT_BACKEND='cuda' .*auto, triton, torch, compiled"):
        select_engine(torch.zeros(1))


def test_forcing_triton_on_cpu_without_the_interpreter(monkeypatch):
    from hf_qat.kernels import select_engine

    monkeypatch.setenv("HF_QAT_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_engine(torch.zeros(1))
