import json

import pytest

from hf_qat import PRESETS, QATConfig, QATConfigError
from hf_qat.config import TERNARY_BITS


def test_defaults_follow_the_contract():
    cfg = QATConfig()
    assert cfg.bits == 4 and cfg.method == "auto" and cfg.resolved_method == "lsq"
    assert cfg.group_size == 32 and cfg.start == "auto" and cfg.fuse_cooldown is True
    assert cfg.scale_dtype == "float16" and cfg.target_modules is None and cfg.embedding_bits is None


@pytest.mark.parametrize(
    "bits,expected_bits,method",
    [(1, 1, "binary"), (1.58, TERNARY_BITS, "seq"), ("ternary", TERNARY_BITS, "seq"), (2, 2, "seq"),
     (3, 3, "lsq"), (4.0, 4, "lsq"), ("8", 8, "lsq")],
)
def test_auto_method_by_bits(bits, expected_bits, method):
    cfg = QATConfig(bits=bits)
    assert cfg.bits == expected_bits and cfg.resolved_method == method


def test_dict_and_json_round_trip(tmp_path):
    cfg = QATConfig(bits="ternary", group_size="channel", target_modules="q_proj", exclude_modules=["k_proj"],
                    embedding_bits=4, activation_bits=8, start=0.25, pretrained_tokens=1e9, fuse_cooldown=False,
                    scale_dtype="bfloat16", scale_lr_multiplier=0.5)
    assert QATConfig.from_dict(cfg.to_dict()) == cfg
    assert QATConfig.from_json_string(cfg.to_json_string()) == cfg
    path = cfg.save_pretrained(tmp_path)
    assert json.load(open(path))["bits"] == TERNARY_BITS
    assert QATConfig.from_pretrained(tmp_path) == cfg
    assert QATConfig.from_pretrained(path) == cfg
    assert cfg.target_modules == ["q_proj"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = QATConfig.from_preset(name)
    assert QATConfig.from_dict(cfg.to_dict()) == cfg
    assert QATConfig.from_preset(name, start=10).start == 10


def test_names_of_families_and_formats_take_any_case():
    config = QATConfig(bits=4, method="MXFP4", embedding_bits=4, embedding_method="LSQ", export_format="GGUF")
    assert (config.method, config.embedding_method, config.export_format) == ("mxfp4", "lsq", "gguf")
    assert QATConfig(method="AUTO", embedding_method="Auto").method == "auto"
    assert config.to_dict() == QATConfig(bits=4, method="mxfp4", embedding_bits=4, embedding_method="lsq",
                                         export_format="gguf").to_dict()


def test_replace_validates():
    cfg = QATConfig()
    assert cfg.replace(bits=2).resolved_method == "seq"
    with pytest.raises(QATConfigError, match="bits"):
        cfg.replace(bits=7)


def test_a_0_1_0_config_file_with_its_empty_extra_field_loads(tmp_path):
    data = {**QATConfig(bits=4).to_dict(), "extra": {}}
    assert QATConfig.from_dict(data) == QATConfig(bits=4)
    with pytest.raises(QATConfigError, match="extra"):
        QATConfig.from_dict({**data, "extra": {"note": "x"}})
