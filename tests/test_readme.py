"""The README's quickstart runs as written: its code block is executed with the two from_pretrained calls,
load_dataset and the Hub upload answered locally (a tiny bf16 Llama, a SmolLM-style tokenizer, a few hundred
lines of text), so a change that breaks the README's code fails here."""

from __future__ import annotations

import json
import os
import re

import torch

from helpers import byte_level_bpe, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    match = re.search(r"<!-- quickstart -->\s*```python\n(.+?)\n```", text, re.S)
    assert match, "README has no '<!-- quickstart -->' python block"
    return match.group(1)


def test_the_readme_quickstart_runs_as_written(tmp_path, monkeypatch):
    import datasets
    import transformers

    from hf_qat.export import hub, load_exported

    requested, pushed = [], []
    tokenizer = byte_level_bpe("smollm")
    model = tiny_llama(vocab=len(tokenizer), dtype=torch.bfloat16)  # SmolLM2 is stored in bf16 on the Hub
    source = open(os.__file__, encoding="utf-8").read()
    lines = [source[i:i + 48] for i in range(0, 9600, 48)]  # short lines: 500 quick steps

    def from_pretrained(answer):
        return lambda name, *args, **kwargs: requested.append(name) or answer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained(tokenizer))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained(model))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: requested.append((name, split)) or
                        datasets.Dataset.from_dict({"text": lines}))
    monkeypatch.setattr(hub, "push_folder", lambda folder, repo, **kwargs: pushed.append((folder, repo)))
    monkeypatch.chdir(tmp_path)

    scope: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend (500 steps in seconds instead of minutes)
    try:
        exec(compile(quickstart(), "README.md quickstart", "exec"), scope)
    finally:
        torch.set_num_threads(threads)

    assert requested == ["HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M",
                         ("roneneldan/TinyStories", "train[:20000]")]
    trainer, info = scope["trainer"], scope["info"]
    assert trainer.state.global_step == 500 and scope["qat"].switch_step == 0  # pretrained on 2T: QAT from step 0
    assert info.format == "compressed-tensors" and info.exact
    assert pushed == [("out/w4", "your-name/SmolLM2-135M-w4-qat")]
    out = tmp_path / "out" / "w4"
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "hf_qat_export.json").read_text())["plan"]["switch_step"] == 0
    ids = torch.tensor([tokenizer("def main():\n    return 0\n")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(load_exported(out)(ids).logits, trainer.model.eval()(ids).logits)
