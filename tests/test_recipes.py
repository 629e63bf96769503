"""recipes/: every YAML recipe is valid, and recipes/train.py runs end to end (one process and DDP)."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import TrainingArguments

from hf_qat import QATConfig
from hf_qat.demo.corpus import load_stdlib_corpus, train_tokenizer
from hf_qat.export import load_exported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "recipes", "train.py")


def load_train_module():
    spec = importlib.util.spec_from_file_location("hf_qat_recipes_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))), ids=os.path.basename)
def test_recipes_are_valid(path, tmp_path):
    recipe = load_train_module().load_recipe(path, [])
    assert {"model", "data", "qat", "training"} <= set(recipe)
    QATConfig(**recipe["qat"])
    training = {**recipe["training"], "output_dir": str(tmp_path), "bf16": False, "use_cpu": True}
    TrainingArguments(**training)
    assert ("config" in recipe["model"]) != ("name_or_path" in recipe["model"])


def test_accelerate_configs_parse():
    for path in glob.glob(os.path.join(ROOT, "recipes", "accelerate", "*.yaml")):
        config = yaml.safe_load(open(path))
        assert config["distributed_type"] in ("NO", "MULTI_GPU", "FSDP")
    fsdp = yaml.safe_load(open(os.path.join(ROOT, "recipes", "accelerate", "fsdp2.yaml")))
    assert fsdp["fsdp_config"]["fsdp_version"] == 2


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    base = tmp_path_factory.mktemp("recipe")
    corpus = load_stdlib_corpus(300_000, 20_000)
    text_files = []
    for i, text in enumerate(corpus.train_text[:6]):
        path = base / f"part{i}.txt"
        path.write_text(text)
        text_files.append(str(path))
    tokenizer = train_tokenizer(corpus.train_text, 320)
    tokenizer.save_pretrained(base / "tokenizer")
    recipe = {
        "model": {"config": {"model_type": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 64, "tie_word_embeddings": True},
                  "tokenizer": str(base / "tokenizer")},
        "data": {"text_files": text_files, "block_size": 64, "eval_blocks": 8},
        "qat": {"bits": 4, "group_size": 16, "start": "auto"},
        "training": {"output_dir": str(base / "run"), "max_steps": 12, "per_device_train_batch_size": 4,
                     "learning_rate": 3.0e-3, "warmup_steps": 2, "logging_steps": 4, "eval_steps": 6,
                     "dataloader_num_workers": 0},
        "export": {"format": "compressed-tensors"},
    }
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return base, path


def test_train_script_runs_a_recipe(tiny_recipe):
    base, path = tiny_recipe
    summary = load_train_module().main(["--recipe", str(path), "--set", "training.output_dir=" + str(base / "one")])
    assert 0 <= summary["switch_step"] < 12 and summary["plan"]["strategy"] == "paper"
    assert math.isfinite(summary["eval_loss"])
    assert summary["export"]["format"] == "compressed-tensors"
    reloaded = load_exported(summary["export"]["path"])
    assert reloaded(torch.randint(0, 320, (1, 8))).logits.shape == (1, 8, 320)
    saved = json.load(open(base / "one" / "summary.json"))
    assert saved["eval_loss"] == summary["eval_loss"]



def test_a_wrong_recipe_fails_before_training(tiny_recipe):
    """A key no section knows is refused with the one meant; an export format the QAT layers cannot reach is refused
    when they are installed, before the first step (it becomes qat.export_format)."""
    base, path = tiny_recipe
    train = load_train_module()
    for key, meant in (("export.formt=gguf", "export.format"), ("model.dtyp=bfloat16", "model.dtype"),
                       ("data.block_siz=16", "data.block_size")):
        with pytest.raises(SystemExit, match=rf"unknown key {key.split('=')[0]}; .*did you mean {meant}\?"):
            train.main(["--recipe", str(path), "--set", key])
    from hf_qat.errors import ExportFormatError, QATConfigError

    out = base / "refused"
    with pytest.raises(ExportFormatError, match="export_format=.gguf.: format .gguf. cannot represent"):
        train.main(["--recipe", str(path), "--set", "export.format=gguf", "--set", "qat.bits=3",
                    "--set", f"training.output_dir={out}"])
    assert not (out / "summary.json").exists() and not list(out.glob("checkpoint-*"))
    with pytest.raises(QATConfigError, match="export_format"):
        train.main(["--recipe", str(path), "--set", "export.format=ggufx"])
    with pytest.raises(SystemExit, match="name one format"):
        train.main(["--recipe", str(path), "--set", "qat.export_format=hf-qat"])

@pytest.mark.slow
def test_train_script_under_torchrun_ddp(tiny_recipe):
    base, path = tiny_recipe
    out = base / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
         "--recipe", str(path), "--set", f"training.output_dir={out}", "--set", "training.per_device_train_batch_size=2"],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(base))
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["export"] and os.path.isfile(os.path.join(summary["export"]["path"], "hf_qat_export.json"))
    assert math.isfinite(summary["eval_loss"])
