"""The cost of QAT in a training step: FP vs weight-only 4-bit QAT vs int8-activation/4-bit-weight QAT vs
MXFP4 and NVFP4 QAT (weight-only).

    python benchmarks/step_overhead.py [--model smollm2-135m|demo|tiny|qwen3-moe|qwen3-moe-gpu|dense-active]
                                       [--out benchmarks/results/step_overhead.json]

Times a full optimizer step (forward, backward, AdamW) and records peak memory for the same model in
each mode. On a GPU the default models are SmolLM2-135M-shaped (576 hidden, 30 layers, 49152 vocab)
and a Qwen3-MoE-shaped model (8 experts, 2 active) in bf16; on a CPU the demo model (0.23M parameters,
what CI trains), the tests' tiny model, a small Qwen3-MoE (8 experts, 2 active) and the dense Qwen3 with
its active parameters. A mixture of experts is timed once per transformers experts implementation
(eager, batched_mm, grouped_mm); int8 activations do not apply to fused experts, so it has two modes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_qat

MODELS = {
    # SmolLM2-135M's shape: the step_overhead target of the kernels issue.
    "smollm2-135m": dict(config=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                     tie_word_embeddings=True), batch=8, seq=1024),
    # The model hf-qat demo trains (and CI, in the quick demo).
    "demo": dict(config=dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=True), batch=16, seq=128),
    # The tests' tiny model: a few thousand parameters, dominated by per-op overhead.
    "tiny": dict(config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=True), batch=4, seq=16),
}
MOE_CPU = dict(architecture="qwen3_moe", vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, intermediate_size=384, moe_intermediate_size=128, num_experts=8,
               num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=True)
MODELS.update({
    # A small Qwen3-MoE (8 experts, 2 active) and the dense Qwen3 with its active parameters (MLP 2 x 128).
    "qwen3-moe": dict(config=MOE_CPU, batch=8, seq=128),
    "dense-active": dict(config={**{k: v for k, v in MOE_CPU.items() if "expert" not in k and k != "moe_intermediate_size"
                                   and k != "norm_topk_prob"}, "architecture": "qwen3", "intermediate_size": 256},
                         batch=8, seq=128),
    # The GPU target: Qwen3-MoE-shaped, 8 experts of 768, 2 active, hidden 1024, 8 layers.
    "qwen3-moe-gpu": dict(config=dict(MOE_CPU, vocab_size=32768, hidden_size=1024, num_hidden_layers=8,
                                      num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                                      intermediate_size=3072, moe_intermediate_size=768, max_position_embeddings=2048),
                          batch=8, seq=1024),
})
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
MODES = {
    "fp": None,
    "w4 QAT": dict(bits=4, group_size=32),
    "a8w4 QAT": dict(bits=4, group_size=32, activation_bits=8),
    "mxfp4 QAT": dict(bits=4, method="mxfp4"),
    "nvfp4 QAT": dict(bits=4, method="nvfp4"),
}


def variants(model_name: str) -> list[tuple[str, str | None]]:
    """``(label, experts implementation)``: one per implementation for a mixture of experts."""
    if MODELS[model_name]["config"].get("architecture") == "qwen3_moe":
        return [(f"{model_name} {impl}", impl) for impl in EXPERTS_IMPLEMENTATIONS]
    return [(model_name, None)]


def modes(model_name: str) -> list[str]:
    moe = MODELS[model_name]["config"].get("architecture") == "qwen3_moe"
    return [m for m in MODES if not (moe and MODES[m] and MODES[m].get("activation_bits"))]


def build(model_name: str, mode: str, device: str, dtype: torch.dtype, experts_implementation: str | None = None):
    """(model, optimizer, step function) for one mode."""
    spec = MODELS[model_name]
    fields = dict(spec["config"])
    architecture = fields.pop("architecture", "llama")
    config = AutoConfig.for_model(architecture, **fields)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
    if MODES[mode] is not None:
        hf_qat.prepare_model_for_qat(model, hf_qat.QATConfig(start=0, **MODES[mode]))
        hf_qat.activate_qat(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, spec["config"]["vocab_size"], (spec["batch"], spec["seq"]), device=device)

    def step():
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, step


def timed(step, device: str) -> float:
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_cpu(model_name: str, iters: int, experts_implementation: str | None = None) -> list[dict]:
    """All modes built at once and timed round-robin, so that machine drift hits them alike."""
    steps = {mode: build(model_name, mode, "cpu", torch.float32, experts_implementation)[2] for mode in modes(model_name)}
    for step in steps.values():
        for _ in range(3):
            step()
    times = {mode: [] for mode in steps}
    for _ in range(iters):
        for mode, step in steps.items():
            times[mode].append(timed(step, "cpu"))
    tokens = MODELS[model_name]["batch"] * MODELS[model_name]["seq"]
    return [{"model": model_name, "experts_implementation": experts_implementation, "mode": mode,
             "step_ms": statistics.median(t) * 1e3, "peak_bytes": None, "tokens_per_step": tokens}
            for mode, t in times.items()]


def measure_cuda(model_name: str, iters: int, experts_implementation: str | None = None) -> list[dict]:
    """One mode at a time (peak memory must be per mode)."""
    rows = []
    for mode in modes(model_name):
        model, optimizer, step = build(model_name, mode, "cuda", torch.bfloat16, experts_implementation)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = [timed(step, "cuda") for _ in range(iters)]
        rows.append({"model": model_name, "experts_implementation": experts_implementation, "mode": mode,
                     "step_ms": statistics.median(times) * 1e3,
                     "peak_bytes": torch.cuda.max_memory_allocated(),
                     "tokens_per_step": MODELS[model_name]["batch"] * MODELS[model_name]["seq"]})
        del model, optimizer, step
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(MODELS), action="append", default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_overhead.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = args.model or (["smollm2-135m", "qwen3-moe-gpu"] if device == "cuda" else ["demo", "tiny", "qwen3-moe",
                                                                                      "dense-active"])
    iters = args.iters or (20 if device == "cuda" else 30)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    print(f"{machine}, {dtype}, torch {torch.__version__}, HF_QAT_BACKEND={os.environ.get('HF_QAT_BACKEND', 'auto')}")
    rows = []
    for name in models:
        for label, implementation in variants(name):
            measure = measure_cuda if device == "cuda" else measure_cpu
            model_rows = measure(name, iters, implementation)
            base = model_rows[0]
            for row in model_rows:
                row["time_ratio"] = row["step_ms"] / base["step_ms"]
                row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"] if row["peak_bytes"] else None
                memory = f", peak {row['peak_bytes'] / 2**30:.2f} GiB (x{row['memory_ratio']:.3f})" if row["peak_bytes"] else ""
                print(f"{label:<24} {row['mode']:<9} {row['step_ms']:9.2f} ms/step (x{row['time_ratio']:.3f}){memory}")
            rows.extend(model_rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "dtype": str(dtype), "results": rows}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
