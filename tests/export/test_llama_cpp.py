"""GGUF exports run in llama.cpp itself (tests/llama_runtime.py): the same token ids, per-token logits close
to the QAT model's, and the same greedy continuation, for every architecture the GGUF writer supports.

Tolerance: llama.cpp's CPU Q4_0 dot products quantize the activations to Q8_0 (int8 per block of 32),
so its logits differ from the fp32 QAT model's by that rounding: about 0.1 % of the logits' spread
here. We require the largest difference under 0.5 % of the spread (ATOL_OF_SPREAD) and equal argmax
on at least 95 % of the positions. The q/k projections are scaled up so that attention is sharp and
position errors show: a Llama-3 rope export without its rope_freqs factors misses by 1.6 % of the
spread and fails. The ternary cases (TQ2_0, TQ1_0: blocks of 256, so hidden 256) keep the attention
as initialised: sharpened at that width, the int8 activation rounding alone reaches 2 % of the spread
even for Q4_0. Their blocks are checked bit for bit in test_formats; here TQ1_0 and TQ2_0 give
llama.cpp the same logits. The FP4 cases (llama-MXFP4, llama-NVFP4; blocks checked in test_fp4_export)
run llama.cpp's own MXFP4 / NVFP4 CPU kernels, NVFP4 with its per-tensor ``<name>.scale``. The k-quant
cases (llama-Q2_K .. -Q6_K, -IQ4_NL, -Q5_1, -Q5_0, qwen3-Q4_K; blocks checked in test_kquant_export) run
llama.cpp's k-quant kernels, whose dot products round activations to Q8_K (int8 per 256, fp32 scale):
measured 0.09-0.17 % of the spread; the mixes (llama-Q4_K_M, 8 layers, Q4_K with Q6_K layers; -320
cases, Q5_0 / Q5_1 / Q8_0 fallbacks beside them) likewise. The MoE cases (mixtral, qwen3_moe, olmoe) compare with llama.cpp's
activation rounding applied to the QAT model (moe_reference). The Gemma cases are set so that each Gemma setting shows: norm weights
moved off their init (written as 1 + w: without the shift the difference is 4 x the spread), a window
of 6 tokens (no window or a window of 7: 4 % and 1.2 % for Gemma-2, 47 % and 23 % for Gemma-3),
strong soft-capping (without the attention cap 1.4 %, without the final cap 86 %), Gemma-3's linear
rope scaling (without it 1.2 %) and local rope base (the global one instead: 46 %).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import hf_qat
from hf_qat import QATConfig
from hf_qat.model.convert import qat_modules
from hf_qat.model.modules import QATLinear
from hf_qat.export import export_checkpoint
from helpers import byte_level_bpe, sentencepiece_bpe, tiny_causal_lm
import llama_runtime

TEXT = "def f(x):\n    return x + 1  # 12345\nclass A:\n    pass\n"
ATOL_OF_SPREAD = 0.005


def qat_train(model, tokenizer, steps: int = 4, bits=4, group_size: int | None = 32, method: str = "auto",
              config: QATConfig | None = None):
    hf_qat.prepare_model_for_qat(model, config or QATConfig(bits=bits, group_size=group_size, method=method, start=0))
    hf_qat.activate_qat(model)
    ids = torch.tensor([tokenizer(TEXT * 3)["input_ids"][:64]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


CASES = {
    "llama": (lambda: tiny_causal_lm("llama"), "gpt-2"),
    "llama3-rope": (lambda: tiny_causal_lm("llama", rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 100.0}), "llama-bpe"),  # a small theta: the
    # scaled (long) wavelengths turn by whole radians within the test text, so a missing rope_freqs fails
    "mistral": (lambda: tiny_causal_lm("mistral", sliding_window=None), "gpt-2"),
    "qwen2": (lambda: tiny_causal_lm("qwen2"), "qwen2"),
    "qwen3": (lambda: tiny_causal_lm("qwen3", head_dim=32), "qwen2"),
}
GEMMA = dict(vocab_size=400, head_dim=16, query_pre_attn_scalar=16, sliding_window=6, final_logit_softcapping=3.0,
             bos_token_id=2, eos_token_id=1, pad_token_id=0)
CASES["gemma2"] = (lambda: tiny_causal_lm("gemma2", attn_logit_softcapping=1.0, **GEMMA), "sentencepiece")
CASES["gemma3"] = (lambda: tiny_causal_lm("gemma3_text", sharpen=2.0, num_hidden_layers=3, layer_types=[
    "sliding_attention", "full_attention", "sliding_attention"], rope_parameters={
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}, **GEMMA), "sentencepiece")
MOE = dict(num_experts_per_tok=2, intermediate_size=64)  # 4 experts of 64, 2 per token (see moe_reference)
CASES["mixtral"] = (lambda: tiny_causal_lm("mixtral", num_local_experts=4, sliding_window=None, **MOE), "gpt-2")
CASES["qwen3_moe"] = (lambda: tiny_causal_lm("qwen3_moe", num_experts=4, moe_intermediate_size=64, head_dim=16,
                                   norm_topk_prob=True, **MOE), "qwen2")
CASES["olmoe"] = (lambda: tiny_causal_lm("olmoe", num_experts=4, num_key_value_heads=4, **MOE), "gpt-2")
MOE_CASES = ("mixtral", "qwen3_moe", "olmoe")


def q8_0_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as llama.cpp's CPU dot products round the activations of a quantized weight: Q8_0 blocks
    of 32 along the input, fp16 scale amax / 127."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    return (torch.round(blocks / d.clamp_min(1e-30)) * d).reshape(x.shape).to(x.dtype)


def q8_k_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as llama.cpp's k-quant dot products round it (``quantize_row_q8_K``): blocks of 256, fp32
    scale ``d = max / -127`` with ``max`` the block's value of largest magnitude, codes at most 127."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // 256, 256)
    peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    iscale = -127.0 / torch.where(peak == 0, 1.0, peak)
    q = torch.round(iscale * blocks).clamp(max=127)
    return (q * torch.where(peak == 0, 0.0, 1.0 / iscale)).reshape(x.shape).to(x.dtype)


@contextlib.contextmanager
def kquant_reference(model):
    """The QAT model with every quantized Linear's input rounded as llama.cpp rounds it for that weight's
    type (Q8_K for the k-quants, Q8_0 otherwise): what separates a real difference from llama.cpp's
    activation rounding, which grows with depth (8 layers of Q4_K_M: 0.55 % of the spread unrounded)."""
    hooks = []
    for _, module in qat_modules(model):
        if isinstance(module, QATLinear):
            super_block = module.weight_quantizer.quantizer.row_multiple  # ggml's k-quant super-block, or None
            rounding = q8_k_activations if super_block == 256 else q8_0_activations
            hooks.append(module.register_forward_pre_hook(lambda _, args, rounding=rounding: (rounding(args[0]),)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def reference_for(case: str, model):
    if case in MOE_CASES:
        return moe_reference(model)
    return kquant_reference(model) if case in KQUANT else contextlib.nullcontext()


@contextlib.contextmanager
def moe_reference(model):
    """The QAT model as llama.cpp computes it where that matters: a mixture of experts turns small
    activation differences into other routing weights (an expert chosen or not, a softmax moved), so
    llama.cpp's int8 activation rounding alone reaches 1-10 % of the logits' spread on these tiny MoEs.
    Its routers (F32 in the file) are sharpened (x20: decisive choices), and every quantized matmul's
    input is rounded as llama.cpp rounds it (q8_0_activations; eager experts, which use F.linear). The
    export is then checked to 0.5 % like the dense ones (measured 0.10 / 0.30 / 0.39 % for mixtral /
    qwen3_moe / olmoe, against 0.2 / 2.3 / 1.1 % without the rounding). Mutations fail: gate and up
    swapped 6.3 / 24.5 / 16.4 %; three experts a token instead of two 1.0 / 5.0 / 7.7 %."""
    linear = torch.nn.functional.linear
    routers = {id(layer.mlp.gate.weight) for layer in model.model.layers}
    head = model.get_output_embeddings().weight

    def rounded(x, weight, bias=None):
        quantized = id(weight) not in routers and weight is not head
        return linear(q8_0_activations(x) if quantized else x, weight, bias)

    model.config._experts_implementation = "eager"
    torch.nn.functional.linear = rounded
    try:
        yield
    finally:
        torch.nn.functional.linear = linear
CASES["llama-sentencepiece"] = (lambda: tiny_causal_lm("llama", vocab_size=400), "sentencepiece-prefix")  # Llama-2's "▁" prefix
TERNARY = {"llama-TQ2_0": "TQ2_0", "llama-TQ1_0": "TQ1_0"}  # case -> GGUF ternary type (blocks 256 wide)
for case in TERNARY:
    CASES[case] = (lambda: tiny_causal_lm("llama", sharpen=1.0, hidden_size=256, intermediate_size=512), "gpt-2")
FP4 = {"llama-MXFP4": "mxfp4", "llama-NVFP4": "nvfp4", "qwen3-NVFP4": "nvfp4"}  # case -> quantizer family
for case in FP4:
    CASES[case] = CASES[case.split("-")[0]]
# ggml's block families (rows of 256 for the k-quants), Q5_0 (5-bit LSQ, g32), and llama.cpp's mixes: 8 layers
# so that Q4_K_M's Q6_K layers show, tied (token_embd as the output: Q6_K) and 320 wide, untied (Q5_0 / Q8_0 /
# Q6_K fallbacks beside Q4_K). case -> (method, bits, group_size) or a preset name.
KQUANT = {"llama-Q2_K": ("q2_k", 2, None), "llama-Q3_K": ("q3_k", 3, None), "llama-Q4_K": ("q4_k", 4, None),
          "llama-Q5_K": ("q5_k", 5, None), "llama-Q6_K": ("q6_k", 6, None), "llama-IQ4_NL": ("iq4_nl", 4, None),
          "llama-Q5_1": ("q5_1", 5, None), "llama-Q5_0": ("lsq", 5, 32), "qwen3-Q4_K": ("q4_k", 4, None),
          "llama-IQ4_XS": ("iq4_xs", 4, None), "llama-Q4_1": ("q4_1", 4, None), "llama-Q1_0": ("q1_0", 1, None),
          "llama-Q4_K_M": "q4_k_m", "llama-Q4_K_M-320": "q4_k_m", "llama-Q5_K_M-320": "q5_k_m",
          "llama-Q3_K_M": "q3_k_m", "llama-Q2_K-file-320": "q2_k", "llama-IQ4_XS-file-320": "iq4_xs"}
for case in KQUANT:
    wide = dict(sharpen=1.0, hidden_size=256, intermediate_size=512)
    if case.startswith("qwen3"):
        CASES[case] = (lambda: tiny_causal_lm("qwen3", head_dim=64, **wide), "qwen2")
    elif case.endswith("-320"):
        CASES[case] = (lambda: tiny_causal_lm("llama", sharpen=1.0, hidden_size=320, intermediate_size=512, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False), "gpt-2")
    elif case.endswith("_M"):
        CASES[case] = (lambda: tiny_causal_lm("llama", num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, **wide),
                       "gpt-2")
    else:
        CASES[case] = (lambda: tiny_causal_lm("llama", **wide), "gpt-2")

# Gemma's embedding multiplies its rows by sqrt(hidden) (in llama.cpp's graph too): a file type quantizes the table
# (tied: the head as well)
KQUANT["gemma2-Q4_0-file"] = "q4_0"
CASES["gemma2-Q4_0-file"] = CASES["gemma2"]

@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_reproduces_the_qat_model(case, tmp_path):
    llama_runtime.runtime()  # before the training: skips without llama.cpp (fails under CI=true)
    build, pre = CASES[case]
    tokenizer = (sentencepiece_bpe(prefix=pre.endswith("-prefix")) if pre.startswith("sentencepiece")
                 else byte_level_bpe(pre))
    if case in TERNARY:
        model = qat_train(build(), tokenizer, bits="ternary", group_size=256)
        options = {"ternary_type": TERNARY[case]}
    elif case in FP4:
        model, options = qat_train(build(), tokenizer, group_size=None, method=FP4[case]), None
    elif case in KQUANT and isinstance(KQUANT[case], str):
        model, options = qat_train(build(), tokenizer, config=QATConfig.from_preset(KQUANT[case], start=0)), None
    elif case in KQUANT:
        method, bits, group_size = KQUANT[case]
        model, options = qat_train(build(), tokenizer, bits=bits, group_size=group_size, method=method), None
    else:
        model, options = qat_train(build(), tokenizer), None
    export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer, format_options=options)
    with llama_runtime.load(tmp_path / "gguf" / "model.gguf", n_ctx=128) as llm:
        ids = tokenizer(TEXT)["input_ids"]  # with the special tokens the tokenizer adds (Gemma: <bos>)
        assert llm.tokenize(TEXT) == ids
        got = np.asarray(llm.eval(ids), dtype=np.float64)
        llm.reset()
        last = llm.eval(ids[:8])[-1]  # the greedy continuation below, as llama.cpp generates it (its KV cache)
        new = []
        for _ in range(8):
            new.append(int(np.argmax(last)))
            last = llm.eval([new[-1]])[-1]
    reference = reference_for(case, model)
    with torch.no_grad(), reference:
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    spread = want.std()
    print(f"{case}: largest difference {np.abs(got - want).max() / spread:.2e} of the logits' spread")
    assert np.abs(got - want).max() < ATOL_OF_SPREAD * spread, (np.abs(got - want).max(), spread)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95

    # greedy continuation: the same first tokens
    context = list(ids[:8])
    with torch.no_grad(), reference_for(case, model):
        for _ in range(8):
            context.append(int(model(torch.tensor([context])).logits[0, -1].argmax()))
    assert new == context[8:]
