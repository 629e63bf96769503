"""MXFP4's exponent rule: OCP's floor(log2 amax) - 2 against the rules that never clip, fixed or learned.

    python benchmarks/fp4_exponent.py [--fp-steps 600] [--qat-steps 200] [--seeds 0 1] [--out results.json]

1. PTQ weight error ``||Q(w) - w||^2 / ||w||^2`` of each rule on Gaussian and Laplace weights and on the
   Linear weights of the FP model trained in step 2 (blocks of 32, E2M1 elements round half to even):
   ocp = 2^(floor(log2 amax) - 2), ceil = 2^ceil(log2(amax / 6)) (never clips), nearest =
   2^round(log2(amax / 6)), best = the best of ocp / 2, ocp and 2 ocp per block.
2. QAT: a Llama (hidden 128, 4 layers, vocab 512, 3.2M parameters) trained in FP on the Python standard
   library's source (the demo corpus, no download) for ``--fp-steps``, then ``--qat-steps`` of MXFP4 QAT
   with the LR decayed to 0 (the fused schedule), from the same FP weights, per rule:
   fixed-ocp (the OCP exponent recomputed from the weights every step, not learned), learned-ocp (the
   mxfp4 family: first scale amax / 4, floored, learned), learned-ceil (first scale
   2^ceil(log2(amax / 6)), learned), and the FP model with the same LR decay as the reference.
   Held-out loss (nats per token) after PTQ and after QAT.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import hf_qat
from hf_qat import QATConfig
from hf_qat.quantizers import Quantizer, e2m1_grid, register_quantizer
from hf_qat.quantizers.block_scales import e8m0
from hf_qat.quantizers.reference import grid_codes


@register_quantizer("bench_mxfp4_fixed_ocp")
class FixedOCP(Quantizer):
    """The OCP exponent recomputed from the current weights every step (no learned scale)."""

    supported_bits = (4,)
    block_size = 32
    scale_dtype = torch.float8_e8m0fnu
    learnable = False

    def grid(self):
        return e2m1_grid()

    def init_scale(self, groups):
        return groups.abs().amax(dim=-1) / 4


@register_quantizer("bench_mxfp4_learned_ceil")
class LearnedCeil(FixedOCP):
    """First scale 2^ceil(log2(amax / 6)): the block maximum never clips; then learned."""

    learnable = True

    def init_scale(self, groups):
        first = groups.abs().amax(dim=-1) / 6
        return torch.where(e8m0(first) == first, first, 2 * e8m0(first))


RULES = {
    "ocp": lambda amax: e8m0(amax / 4),
    "ceil": lambda amax: torch.where(e8m0(amax / 6) == amax / 6, amax / 6, 2 * e8m0(amax / 6)),
    "nearest": lambda amax: e8m0(amax / 6 * math.sqrt(2)),
}


def mxfp4(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Blocks ``w [n, 32]`` on E2M1 with power-of-two scales ``s [n, 1]``."""
    return grid_codes(w / s, e2m1_grid()) * 0.5 * s


def ptq_errors(w: torch.Tensor) -> dict[str, float]:
    blocks = w.float().reshape(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    norm = blocks.pow(2).sum()
    out = {}
    per_block = {}
    for name, rule in RULES.items():
        err = (mxfp4(blocks, rule(amax)) - blocks).pow(2)
        out[name] = float(err.sum() / norm)
    ocp = RULES["ocp"](amax)
    for k, s in enumerate((ocp / 2, ocp, ocp * 2)):
        per_block[k] = (mxfp4(blocks, s) - blocks).pow(2).sum(-1)
    out["best"] = float(torch.stack(list(per_block.values())).amin(0).sum() / norm)
    return out


def build(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                        tie_word_embeddings=True))


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=b, labels=b).loss) for b in blocks.split(16)]
    model.train()
    return sum(losses) / len(losses)


def train(model, blocks, steps: int, lr: float, decay: bool, seed: int, scale_lr: float = 0.02) -> None:
    weights = [p for n, p in model.named_parameters() if not n.endswith("log_scale_ratio")]
    scales = [p for n, p in model.named_parameters() if n.endswith("log_scale_ratio")]
    groups = [{"params": weights, "lr": lr, "weight_decay": 0.1}]
    if scales:
        groups.append({"params": scales, "lr": scale_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (1 - i / steps) if decay else min(1.0, (i + 1) / 30))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = blocks[torch.randint(0, blocks.shape[0], (16,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp-steps", type=int, default=600)
    parser.add_argument("--qat-steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from hf_qat.demo.corpus import load_stdlib_corpus, make_blocks, train_tokenizer

    gen = torch.Generator().manual_seed(0)
    results = {"ptq_weight_error": {
        "gaussian": ptq_errors(torch.randn(4096, 256, generator=gen)),
        "laplace": ptq_errors(torch.distributions.Laplace(0.0, 1.0).sample((4096, 256))),
    }, "qat": {}}
    corpus = load_stdlib_corpus(3_000_000, 300_000)
    tokenizer = train_tokenizer(corpus.train_text, 512)
    train_blocks = make_blocks(corpus.train_text, tokenizer, 64)
    eval_blocks = make_blocks(corpus.eval_text, tokenizer, 64, max_blocks=256)
    for seed in args.seeds:
        t0 = time.time()
        trunk = build(seed)
        train(trunk, train_blocks, args.fp_steps, 3e-3, decay=False, seed=seed)
        state = {k: v.clone() for k, v in trunk.state_dict().items()}
        linear = torch.cat([m.weight.detach().reshape(-1) for n, m in trunk.named_modules()
                            if isinstance(m, torch.nn.Linear) and "lm_head" not in n])
        results["ptq_weight_error"][f"trained_seed{seed}"] = ptq_errors(linear)
        row = {}
        fp = build(seed)
        fp.load_state_dict(state)
        train(fp, train_blocks, args.qat_steps, 3e-3, decay=True, seed=seed + 100)
        row["fp-cooldown"] = {"qat": evaluate(fp, eval_blocks)}
        for name, method in (("fixed-ocp", "bench_mxfp4_fixed_ocp"), ("learned-ocp", "mxfp4"),
                             ("learned-ceil", "bench_mxfp4_learned_ceil")):
            model = build(seed)
            model.load_state_dict(state)
            hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, method=method, start=0))
            hf_qat.activate_qat(model)
            ptq = evaluate(model, eval_blocks)
            train(model, train_blocks, args.qat_steps, 3e-3, decay=True, seed=seed + 100)
            row[name] = {"ptq": ptq, "qat": evaluate(model, eval_blocks)}
        results["qat"][f"seed{seed}"] = row
        print(f"seed {seed} ({time.time() - t0:.0f} s): " + "; ".join(
            f"{k} " + " -> ".join(f"{v:.4f}" for v in r.values()) for k, r in row.items()), flush=True)
    for name, errors in results["ptq_weight_error"].items():
        print(f"PTQ relative weight error, {name}: " + ", ".join(f"{k} {v:.5f}" for k, v in errors.items()))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
