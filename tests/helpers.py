"""Shared test utilities: tiny models built from configs, data the tests make, Trainer arguments.

Nothing here downloads anything: the tests run offline.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

VOCAB = 64
SEQ = 16


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 != +0.0 and every ulp counts."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def without_package(monkeypatch, missing: str) -> None:
    """As if the Python package ``missing`` were not installed, for hf_qat's checks that ask before loading."""
    import hf_qat.export.base

    installed = hf_qat.export.base.installed
    monkeypatch.setattr(hf_qat.export.base, "installed", lambda module: module != missing and installed(module))


def assert_same(got: torch.Tensor | None, want: torch.Tensor | None) -> None:
    """The same bits, except that a NaN may be any NaN (a NaN's payload is not the math's)."""
    if want is None:
        assert got is None
        return
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(bits_of(got.masked_fill(nan, 0)), bits_of(want.masked_fill(nan, 0)))


def tiny_llama_config(tie: bool = True, vocab: int = VOCAB, hidden: int = 32, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> LlamaForCausalLM:
    """A tiny Llama with random weights from ``seed`` in ``dtype`` (built as from_pretrained builds it: the
    rotary frequencies stay fp32)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(tiny_llama_config(**kwargs), dtype=dtype)


def token_dataset(n: int = 256, seq: int = SEQ, vocab: int = VOCAB, seed: int = 1) -> list[dict]:
    """Sequences from a fixed random bigram chain (learnable, so losses move)."""
    g = torch.Generator().manual_seed(seed)
    transition = torch.softmax(torch.randn(vocab, vocab, generator=g) * 3, dim=-1)
    rows = []
    for _ in range(n):
        tok = [int(torch.randint(0, vocab, (1,), generator=g))]
        for _ in range(seq - 1):
            tok.append(int(torch.multinomial(transition[tok[-1]], 1, generator=g)))
        ids = torch.tensor(tok)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def training_args(output_dir, max_steps: int = 20, **overrides) -> TrainingArguments:
    kwargs = dict(
        use_cpu=True, report_to=[], max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=5, save_strategy="no", disable_tqdm=True, seed=0,
        weight_decay=0.1, warmup_steps=2, lr_scheduler_type="linear", train_sampling_strategy="sequential",
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(str(output_dir), **kwargs)


def make_trainer(output_dir, callbacks=(), model=None, data=None, **arg_overrides) -> Trainer:
    return Trainer(
        model=model if model is not None else tiny_llama(),
        args=training_args(output_dir, **arg_overrides),
        train_dataset=data if data is not None else token_dataset(),
        callbacks=list(callbacks),
    )


def state_dict_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


DISTRIBUTED_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed", "train_script.py")
FSDP_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed", "fsdp_script.py")


GLOO_ABORT = "terminate called without an active exception"


def run_distributed(out_dir, nproc: int, *script_args: str, script: str = DISTRIBUTED_SCRIPT, timeout: int = 600) -> None:
    """Run a tests/distributed script in ``nproc`` CPU processes (torchrun, gloo), or plainly for
    ``nproc == 1``; raise with its output if it fails. A run whose rank dies in gloo's runtime (SIGABRT,
    "terminate called without an active exception": seen in two fresh-clone CI runs of 2026-12-03 and 12-04,
    one of them mid-training, although the group is torn down behind a barrier) is run once more, from the start; any other failure, or that
    abort twice, raises."""
    os.makedirs(out_dir, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    if nproc == 1:
        cmd = [sys.executable, script, "--out", str(out_dir), *script_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               script, "--out", str(out_dir), *script_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and GLOO_ABORT in proc.stderr:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def qat_trained_model(cfg, steps: int = 3, seed: int = 0, lr: float = 1e-2, **model_kwargs):
    """A tiny Llama after ``steps`` AdamW steps of QAT (from step 0) with QATConfig ``cfg``."""
    import hf_qat

    model = tiny_llama(seed=seed, **model_kwargs)
    hf_qat.prepare_model_for_qat(model, cfg)
    hf_qat.activate_qat(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = token_dataset(n=steps * 4, vocab=model.config.vocab_size)
    for step in range(steps):
        batch = torch.stack([row["input_ids"] for row in data[step * 4:(step + 1) * 4]])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


RELOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
kwargs = {'gguf_file': 'model.gguf'} if sys.argv[2] == 'gguf' else {}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
assert 'hf_qat' not in sys.modules, 'hf_qat was imported'
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[3])).logits, sys.argv[4])
"""


def logits_in_fresh_process(directory, fmt: str, input_ids: torch.Tensor, tmp_path) -> torch.Tensor:
    """Load an export with plain transformers in a new Python process that never imports hf_qat."""
    x_path, out_path = str(tmp_path / "x.pt"), str(tmp_path / "logits.pt")
    torch.save(input_ids, x_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(directory), fmt, x_path, out_path],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    if proc.returncode != 0:
        raise AssertionError(f"reload of {directory} failed:\n{proc.stderr[-6000:]}")
    return torch.load(out_path)


def byte_level_bpe(pre: str, vocab: int = 320):
    """A byte-level BPE tokenizer with one of the pre-tokenizers llama.cpp names (trained on test text)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_qat.llamacpp.vocab import LLAMA3_SPLIT, QWEN2_SPLIT

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    split = lambda pattern: pre_tokenizers.Sequence([  # noqa: E731
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                           use_regex=False)])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = {"gpt-2": byte_level, "llama-bpe": split(LLAMA3_SPLIT), "qwen2": split(QWEN2_SPLIT),
                         "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
                         "whitespace": pre_tokenizers.WhitespaceSplit()}[pre]
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x + 1  # 12345\n" * 30, "class A:\n    pass\n" * 30],
                            trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def sentencepiece_bpe(vocab: int = 400, prefix: bool = False):
    """A Gemma tokenizer (transformers' GemmaTokenizer: BPE with byte fallback over text whose spaces
    are "▁") trained on test text, its merges completed as transformers converts a SentencePiece
    model: every split of a token into two tokens is a merge, ranked by the token's own rank.
    ``prefix``: also prepend "▁" to the text, as Llama-2's tokenizer does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer_tok.train_from_iterator(["def f(x):\n    return x + 1  # 12345\n" * 30, "class A:\n    pass\n" * 30],
                                    trainers.BpeTrainer(vocab_size=vocab - 256, special_tokens=specials,
                                                        show_progress=False))
    learned = sorted((i, t) for t, i in trainer_tok.get_vocab().items() if t not in specials)
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + [t for _, t in learned]
    ids = {t: i for i, t in enumerate(tokens)}
    pieces = {t for _, t in learned}
    merges = sorted(((ids[t], ids[t[:k]], ids[t[k:]]), (t[:k], t[k:])) for t in pieces for k in range(1, len(t))
                    if t[:k] in pieces and t[k:] in pieces)
    tokenizer = GemmaTokenizer(vocab=ids, merges=[pair for _, pair in merges], add_bos_token=True)
    if prefix:
        tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                                       normalizers.Replace(" ", "▁")])
    return tokenizer


# Tiny mixture-of-experts models (transformers 5 fused experts): 4 experts of width 16 per layer.
MOE_CONFIGS = {
    "qwen3_moe": dict(moe_intermediate_size=16, intermediate_size=64, num_experts=4, num_experts_per_tok=2, head_dim=8),
    "mixtral": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2, eos_token_id=None, pad_token_id=None),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"]),
    "qwen2_moe": dict(moe_intermediate_size=16, intermediate_size=64, shared_expert_intermediate_size=32,
                      num_experts=4, num_experts_per_tok=2),
}


def tiny_moe(model_type: str, seed: int = 0, experts_implementation: str | None = None,
             dtype: torch.dtype = torch.float32, **overrides):
    """A tiny causal LM of one MoE family (vocab 64, hidden 32, 2 layers), random weights from ``seed``, in
    ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  **{**MOE_CONFIGS[model_type], **overrides})
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def tiny_causal_lm(model_type: str, sharpen: float = 4.0, **extra):
    """A 2-layer model of ``model_type`` (seed 0) for the llama.cpp tests: q/k scaled by ``sharpen`` (sharp
    attention: the logits depend on positions), norms off their init, MoE routers x20 (decisive)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=0,
                  eos_token_id=0)
    fields.update(extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    with torch.no_grad():  # sharp attention: the logits depend on positions
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
        for name, param in model.named_parameters():  # norms that differ: each must be written where it belongs
            if name.endswith("norm.weight"):
                param.add_(torch.randn(param.shape) * 0.3)
            if name.endswith("mlp.gate.weight"):  # MoE routers: decisive (moe_reference)
                param.mul_(20.0)
    return model
