"""Train (or QAT-finetune) a causal LM with compute-optimal QAT, from a YAML recipe.

    python recipes/train.py --recipe recipes/finetune_smollm2_w4.yaml
    accelerate launch --config_file recipes/accelerate/fsdp2.yaml recipes/train.py --recipe recipes/pretrain_llama_w4.yaml
    python recipes/train.py --recipe recipes/pretrain_llama_w4.yaml --set training.max_steps=100 --set qat.bits=2

A recipe has five sections (see the YAML files beside this script):
  model:    name_or_path (+ gguf_file, dtype) of a pretrained model, or config: {...} to train from scratch;
            tokenizer (default: the model's).
  data:     dataset (a Hub id, with config_name/split) or text_files / jsonl_files (local), or
            stdlib: true (the Python standard library's source, offline); text_column, block_size,
            eval_blocks.
  qat:      QATConfig fields (start: auto, bits, group_size, ...).
  training: TrainingArguments fields (output_dir, max_steps, learning_rate, eval_steps, ...).
  export:   format (auto, compressed-tensors, gguf, bitnet, hf-qat, or none), dir, push_to_hub, private. A named
            format is also the run's qat.export_format: the model is checked against it before the first step.
A key a section does not know is refused (qat and training: by QATConfig and TrainingArguments).
The run: FP training, the planned switch to QAT with the fused cooldown, periodic eval, export of the
low-bit model (rank 0 writes), and a summary with the plan and the final eval loss.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_qat
from hf_qat.pretrained import load_for_training


# The keys of the sections this script reads itself (qat and training go to QATConfig and TrainingArguments).
SECTION_KEYS = {
    "model": ("name_or_path", "gguf_file", "dtype", "config", "tokenizer", "seed"),
    "data": ("dataset", "config_name", "split", "text_files", "jsonl_files", "stdlib", "text_column", "block_size",
             "eval_blocks"),
    "export": ("format", "dir", "push_to_hub", "private"),
}


def load_recipe(path: str, overrides: list[str]) -> dict:
    """The YAML recipe with ``section.key=value`` overrides (values parsed as YAML)."""
    with open(path, encoding="utf-8") as fh:
        recipe = yaml.safe_load(fh) or {}
    for item in overrides:
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--set takes section.key=value, got {item!r}")
        *parents, leaf = key.split(".")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    unknown = set(recipe) - {"model", "data", "qat", "training", "export"}
    if unknown:
        raise SystemExit(f"unknown recipe sections {sorted(unknown)}; allowed: model, data, qat, training, export")
    for section, keys in SECTION_KEYS.items():
        for key in sorted(set(recipe.get(section) or {}) - set(keys)):
            close = difflib.get_close_matches(key, keys, n=1)
            raise SystemExit(f"unknown key {section}.{key}; allowed: {', '.join(keys)}"
                             + (f" (did you mean {section}.{close[0]}?)" if close else ""))
    return recipe


def qat_config(recipe: dict) -> hf_qat.QATConfig:
    """The qat section, with the export section's format as ``export_format`` (checked before the first step)."""
    fields = dict(recipe.get("qat") or {})
    fmt = (recipe.get("export") or {}).get("format") or "auto"
    if not isinstance(fmt, str):
        raise SystemExit(f"export.format={fmt!r} is not allowed; allowed: auto, none, or a format's name")
    if fmt not in ("auto", "none") and str(fields.setdefault("export_format", fmt)).lower() != fmt.lower():
        raise SystemExit(f"export.format={fmt!r} but qat.export_format={fields['export_format']!r}: name one format")
    return hf_qat.QATConfig(**fields)


def build_model_and_tokenizer(spec: dict, data_spec: dict):
    if "config" in spec:  # from scratch
        config = dict(spec["config"])
        config = AutoConfig.for_model(config.pop("model_type", "llama"), **config)
        torch.manual_seed(spec.get("seed", 0))
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.get("dtype", "float32")))
    else:
        model = load_for_training(spec["name_or_path"], gguf_file=spec.get("gguf_file"), dtype=spec.get("dtype"))
    tokenizer_source = spec.get("tokenizer") or spec.get("name_or_path")
    if tokenizer_source is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, gguf_file=spec.get("gguf_file"))
    elif data_spec.get("stdlib"):
        from hf_qat.demo.corpus import load_stdlib_corpus, train_tokenizer

        tokenizer = train_tokenizer(load_stdlib_corpus(4_000_000, 1).train_text, model.config.vocab_size)
    else:
        raise SystemExit("model.tokenizer is required when the model is built from a config")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens but the model embeds only "
                         f"{model.get_input_embeddings().num_embeddings}: raise model.config.vocab_size")
    return model, tokenizer


def build_datasets(spec: dict, tokenizer, train_blocks_needed: int):
    """(train, eval) datasets of fixed-length blocks with input_ids and labels."""
    block = int(spec.get("block_size", 1024))
    eval_blocks = int(spec.get("eval_blocks", 64))
    if spec.get("stdlib"):
        from hf_qat.demo.corpus import BlockDataset, load_stdlib_corpus, make_blocks

        corpus = load_stdlib_corpus(max_train_bytes=train_blocks_needed * block * 4, max_eval_bytes=eval_blocks * block * 5)
        return (BlockDataset(make_blocks(corpus.train_text, tokenizer, block, max_blocks=train_blocks_needed)),
                BlockDataset(make_blocks(corpus.eval_text, tokenizer, block, max_blocks=eval_blocks)))
    from datasets import load_dataset

    if spec.get("text_files"):
        raw = load_dataset("text", data_files=spec["text_files"], split="train")
    elif spec.get("jsonl_files"):
        raw = load_dataset("json", data_files=spec["jsonl_files"], split="train")
    else:
        raw = load_dataset(spec["dataset"], spec.get("config_name"), split=spec.get("split", "train"),
                           streaming=False)
    column = spec.get("text_column", "text")
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"ids": [ids + [eos] for ids in tokenizer(batch[column])["input_ids"]]}

    def group(batch):
        flat = [t for ids in batch["ids"] for t in ids]
        n = len(flat) // block
        blocks = [flat[i * block:(i + 1) * block] for i in range(n)]
        return {"input_ids": blocks, "labels": blocks}

    tokens = raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc="tokenizing")
    blocks = tokens.map(group, batched=True, remove_columns=["ids"], desc=f"blocks of {block}")
    split = blocks.train_test_split(test_size=min(eval_blocks, max(1, len(blocks) // 10)), seed=0, shuffle=True)
    return split["train"], split["test"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)
    config = qat_config(recipe)  # a wrong field fails here, before the model and the data load

    training = dict(recipe.get("training", {}))
    training.setdefault("output_dir", os.path.join("runs", os.path.splitext(os.path.basename(args.recipe))[0]))
    training.setdefault("report_to", [])
    training.setdefault("save_strategy", "no")
    if not torch.cuda.is_available():
        training.setdefault("use_cpu", True)
    if training.get("eval_steps"):
        training.setdefault("eval_strategy", "steps")
    targs = TrainingArguments(**training)

    model, tokenizer = build_model_and_tokenizer(recipe.get("model", {}), recipe.get("data", {}))
    blocks_needed = targs.max_steps * targs.per_device_train_batch_size * targs.gradient_accumulation_steps * targs.world_size
    train_ds, eval_ds = build_datasets(recipe.get("data", {}), tokenizer, blocks_needed)
    callback = hf_qat.QATCallback(config)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds, callbacks=[callback])
    trainer.train()
    metrics = trainer.evaluate()

    export = recipe.get("export", {}) or {}
    info = None
    if export.get("format", "auto") != "none":
        out = export.get("dir") or os.path.join(targs.output_dir, "export")
        info = hf_qat.export_checkpoint(
            trainer.model, out, format=config.export_format or export.get("format", "auto"), tokenizer=tokenizer,
            push_to_hub=export.get("push_to_hub"), private=export.get("private", True),
            base_model=recipe.get("model", {}).get("name_or_path"), plan=callback.plan,
            card={"eval": {"eval loss": metrics["eval_loss"]}, "training_tokens": callback.plan.total_tokens if callback.plan else None},
        )
    summary = {
        "switch_step": callback.switch_step, "max_steps": targs.max_steps,
        "plan": callback.plan.to_dict() if callback.plan else None, "eval_loss": metrics["eval_loss"],
        "eval_perplexity": math.exp(metrics["eval_loss"]),
        "export": {"format": info.format, "path": info.path, "weight_bytes": info.weight_bytes} if info else None,
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(targs.output_dir, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
        print(json.dumps({k: v for k, v in summary.items() if k != "plan"}, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    if torch.distributed.is_initialized():  # under torchrun: gloo can abort a rank at exit with the group alive
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
