"""The cost of QAT in a training step: FP vs weight-only 4-bit QAT vs int8-activation/4-bit-weight QAT vs
MXFP4 and NVFP4 QAT (weight-only).

    python benchmarks/step_overhead.py [--model smollm2-135m|demo|tiny|qwen3-moe|qwen3-moe-gpu|dense-active]
                                       [--all-formats] [--modes M ...] [--memory] [--batch B --seq L] [--iters N]
                                       [--experts eager batched_mm grouped_mm]
                                       [--backends torch compiled] [--optimizer fused|foreach|loop]
                                       [--out benchmarks/results/step_overhead.json]

Times a full optimizer step (forward, backward, AdamW: fused, the Trainer's default, unless ``--optimizer``)
and records peak memory for the same model in each mode. On a CPU each mode is timed in turn with an FP twin
stepped alternately (its ratio is the median of each step over the FP step of the same round), so two models are
held at a time whatever the number of modes. On a GPU the default models are SmolLM2-135M-shaped (576 hidden, 30 layers, 49152 vocab)
and a Qwen3-MoE-shaped model (8 experts, 2 active) in bf16; on a CPU the demo model (0.23M parameters,
what CI trains), the tests' tiny model, a small Qwen3-MoE (8 experts, 2 active) and the dense Qwen3 with
its active parameters; ``--model smollm2-135m`` on a CPU steps 4 x 256 tokens (8 x 1024 on a GPU) unless ``--batch``
/ ``--seq`` say otherwise. A mixture of experts is timed once per transformers experts implementation
(eager, batched_mm, grouped_mm); int8 activations do not apply to fused experts, so it has two modes.
``--all-formats`` adds every family and llama.cpp file type; ``--memory`` (CPU) measures each mode's peak
resident memory in a fresh process (the CUDA run always records its peak allocation). The engine is
``HF_QAT_BACKEND``'s (``HF_QAT_BACKEND=compiled`` times the TorchInductor-compiled reference on a CPU; each mode's
warm-up step compiles its kernels, so the timed steps do not; its ``--memory`` peaks include what compiling
holds), recorded in the JSON; ``--backends torch compiled`` steps each QAT model on both engines in turn, in
one window with its FP twin (on a shared CPU, a comparison of engines across runs is mostly noise).

On a CPU, glibc's allocator shapes the figures: it maps each large temporary afresh and unmaps it when freed,
so every step pays page faults for what it allocates, and a QAT format allocates more (a8w4's rounded inputs
above all). ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296`` before the command keeps
freed memory for reuse instead (README, "Cost of a QAT step"); the allocator's environment (``MALLOC_*``,
``GLIBC_TUNABLES``, ``LD_PRELOAD``) is printed and recorded in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_qat
from hf_qat.kernels.dispatch import BACKENDS, requested_backend

MODELS = {
    # SmolLM2-135M's shape: the model of the step-cost targets; 4 x 256 tokens a step on a CPU (``cpu``), 8 x 1024 on a GPU.
    "smollm2-135m": dict(config=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                     tie_word_embeddings=True), batch=8, seq=1024, cpu=dict(batch=4, seq=256)),
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
# AdamW as the Trainer builds it: fused is its default optim ("adamw_torch_fused") since torch 2.8, on a CPU too;
# a per-parameter loop pays for every small scale tensor QAT adds (about 0.05x of a SmolLM2-135M step on 2 cores).
OPTIMIZERS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False, fused=False)}
MODES = {
    "fp": None,
    "w4 QAT": dict(bits=4, group_size=32),
    "a8w4 QAT": dict(bits=4, group_size=32, activation_bits=8),
    "mxfp4 QAT": dict(bits=4, method="mxfp4"),
    "nvfp4 QAT": dict(bits=4, method="nvfp4"),
}
# --all-formats: every family (LSQ, SEQ, ternary) and llama.cpp's file types (each weight on the type llama.cpp
# gives it in that file, fallbacks included: the k-quant families need rows of 256, which these shapes have only
# in places)
EVERY_FORMAT = {
    "w2 lsq": dict(bits=2, method="lsq", group_size=32), "w2 seq": dict(bits=2, group_size=32),
    "w3 lsq": dict(bits=3, group_size=32), "w8 lsq": dict(bits=8, group_size=32),
    "ternary": dict(bits="ternary", group_size=32),
    **{f"{file_type} file": dict(preset=file_type)
       for file_type in ("q4_0", "q4_1", "q8_0", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")},
}


def qat_config(mode: str) -> hf_qat.QATConfig:
    fields = dict(MODES[mode])
    preset = fields.pop("preset", None)
    return (hf_qat.QATConfig.from_preset(preset, start=0, **fields) if preset else
            hf_qat.QATConfig(start=0, **fields))


def variants(model_name: str, implementations=EXPERTS_IMPLEMENTATIONS) -> list[tuple[str, str | None]]:
    """``(label, experts implementation)``: one per implementation for a mixture of experts."""
    if MODELS[model_name]["config"].get("architecture") == "qwen3_moe":
        return [(f"{model_name} {impl}", impl) for impl in implementations]
    return [(model_name, None)]


def modes(model_name: str) -> list[str]:
    moe = MODELS[model_name]["config"].get("architecture") == "qwen3_moe"
    return [m for m in MODES if not (moe and MODES[m] and MODES[m].get("activation_bits"))]


def build(model_name: str, mode: str, device: str, dtype: torch.dtype, experts_implementation: str | None = None,
          optimizer: str = "fused"):
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
        hf_qat.prepare_model_for_qat(model, qat_config(mode))
        hf_qat.activate_qat(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **OPTIMIZERS[optimizer])
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


def peak_rss(model_name: str, mode: str | None, iters: int, experts_implementation: str | None,
             backend: str | None = None, optimizer: str = "fused") -> int:
    """Peak resident bytes of a fresh process that builds ``mode`` and takes ``iters`` steps (CPU peak memory:
    parameters, optimizer state, activations and every temporary of the step) over one that only imports the
    libraries (``mode=None``: that baseline itself)."""
    spec = MODELS[model_name]
    code = ("import sys; sys.path.insert(0, %r); import step_overhead as b; b.MODES.update(b.EVERY_FORMAT); "
            "b.MODELS[%r].update(batch=%d, seq=%d)\n"
            "if %r is not None:\n"
            "    step = b.build(%r, %r, 'cpu', b.torch.float32, %r, %r)[2]\n"
            "    for _ in range(%d): step()\n"
            "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))") % (
        os.path.dirname(os.path.abspath(__file__)), model_name, spec["batch"], spec["seq"], mode, model_name, mode,
        experts_implementation, optimizer, iters)
    env = dict(os.environ, **({"HF_QAT_BACKEND": backend} if backend else {}))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    # VmHWM (KiB): the high-water mark of this process's own memory (ru_maxrss would carry the parent's over fork)
    peak = int(out.stdout.split()[-1]) * 1024
    return peak if mode is None else peak - peak_rss(model_name, None, 0, experts_implementation, backend, optimizer)


def measure_cpu(model_name: str, iters: int, experts_implementation: str | None = None,
                memory: bool = False, backends: list[str] | None = None, optimizer: str = "fused") -> list[dict]:
    """Each mode timed against an FP model of its own window: the two are built side by side and stepped in
    turn, so that machine drift hits both alike and only two models are held at once (SmolLM2's shape with
    every format would not fit otherwise); the FP row is the median of every window's FP steps. ``backends``:
    the same QAT model stepped on each engine in turn within the window (``HF_QAT_BACKEND`` is read at every
    call), one row each; None: the environment's. With ``memory``, each row's peak RSS in a process of its own."""
    def steps_of(*fns) -> list[list[float]]:
        for fn in fns:  # one warm-up step each (the compiled engine compiles here)
            fn()
        times = [[] for _ in fns]
        for _ in range(iters):
            for k, fn in enumerate(fns):
                times[k].append(timed(fn, "cpu"))
        return times

    def on(backend: str, step):
        def run():
            before = os.environ.get("HF_QAT_BACKEND")
            os.environ["HF_QAT_BACKEND"] = backend
            try:
                step()
            finally:  # the next model is built, and the JSON labelled, under the caller's setting
                if before is None:
                    del os.environ["HF_QAT_BACKEND"]
                else:
                    os.environ["HF_QAT_BACKEND"] = before
        return run

    fp_step = build(model_name, "fp", "cpu", torch.float32, experts_implementation, optimizer)[2]
    tokens = MODELS[model_name]["batch"] * MODELS[model_name]["seq"]
    engines = backends or [requested_backend()]
    fp_times, rows = [], []
    for mode in modes(model_name)[1:]:
        step = build(model_name, mode, "cpu", torch.float32, experts_implementation, optimizer)[2]
        fp_window, *mode_times = steps_of(fp_step, *(on(backend, step) for backend in engines))
        del step
        gc.collect()
        fp_times.extend(fp_window)
        for backend, times in zip(engines, mode_times):
            # the ratio is the median of each step over the FP step of the same round: a drift of the machine between
            # rounds (seconds on a shared CPU) cancels out of each pair
            rows.append({"model": model_name, "experts_implementation": experts_implementation, "mode": mode,
                         "backend": backend, "step_ms": statistics.median(times) * 1e3,
                         "fp_step_ms": statistics.median(fp_window) * 1e3, "tokens_per_step": tokens,
                         "time_ratio": statistics.median(t / fp for t, fp in zip(times, fp_window)),
                         "steps_ms": [t * 1e3 for t in times], "fp_steps_ms": [t * 1e3 for t in fp_window]})
            print(f"  {mode} [{backend}]: {rows[-1]['step_ms']:.1f} ms against FP {rows[-1]['fp_step_ms']:.1f} ms, "
                  f"x{rows[-1]['time_ratio']:.3f} step by step", flush=True)
    rows.insert(0, {"model": model_name, "experts_implementation": experts_implementation, "mode": "fp",
                    "backend": None, "step_ms": statistics.median(fp_times) * 1e3, "tokens_per_step": tokens})
    for row in rows:
        row["peak_bytes"] = (peak_rss(model_name, row["mode"], 2, experts_implementation, row["backend"], optimizer)
                             if memory else None)
    return rows


def measure_cuda(model_name: str, iters: int, experts_implementation: str | None = None,
                 optimizer: str = "fused", progress=lambda rows: None) -> list[dict]:
    """One mode at a time (peak memory must be per mode); ``progress(rows)`` after each."""
    rows = []
    for mode in modes(model_name):
        model, adamw, step = build(model_name, mode, "cuda", torch.bfloat16, experts_implementation, optimizer)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = [timed(step, "cuda") for _ in range(iters)]
        rows.append({"model": model_name, "experts_implementation": experts_implementation, "mode": mode,
                     "step_ms": statistics.median(times) * 1e3,
                     "peak_bytes": torch.cuda.max_memory_allocated(),
                     "tokens_per_step": MODELS[model_name]["batch"] * MODELS[model_name]["seq"]})
        print(f"  {mode}: {rows[-1]['step_ms']:.2f} ms, peak {rows[-1]['peak_bytes'] / 2**30:.2f} GiB", flush=True)
        progress(rows)
        del model, adamw, step
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(MODELS), action="append", default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--all-formats", action="store_true", help="every family and llama.cpp file type")
    parser.add_argument("--modes", nargs="+", default=None, help="only these modes (fp is always first)")
    parser.add_argument("--memory", action="store_true", help="CPU: each mode's peak RSS in a fresh process")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="CPU: step each QAT model on these engines in turn (e.g. torch compiled)")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="fused",
                        help="AdamW's implementation (fused: the Trainer's default)")
    parser.add_argument("--batch", type=int, default=None, help="override the model's batch size")
    parser.add_argument("--seq", type=int, default=None, help="override the model's sequence length")
    parser.add_argument("--experts", nargs="+", choices=EXPERTS_IMPLEMENTATIONS, default=list(EXPERTS_IMPLEMENTATIONS),
                        help="a mixture of experts: these implementations of its experts")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_overhead.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.all_formats:
        MODES.update(EVERY_FORMAT)
    if args.modes:
        unknown = sorted(set(args.modes) - set(MODES))
        if unknown:
            parser.error(f"--modes {unknown}: modes are {', '.join(MODES)} (--all-formats adds the rest)")
        for mode in [m for m in MODES if m != "fp" and m not in args.modes]:
            del MODES[mode]
    for name in args.model or ():
        MODELS[name].update(MODELS[name].get(device, {}))  # the device's own shape, where the model names one
        MODELS[name].update({k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v is not None})
    if args.backends and device == "cuda":
        parser.error("--backends compares engines on a CPU; on CUDA set HF_QAT_BACKEND (auto runs Triton)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = args.model or (["smollm2-135m", "qwen3-moe-gpu"] if device == "cuda" else ["demo", "tiny", "qwen3-moe",
                                                                                      "dense-active"])
    iters = args.iters or (20 if device == "cuda" else 30)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    allocator = {name: value for name, value in sorted(os.environ.items())
                 if name.startswith("MALLOC_") or name in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    print(f"{machine}, {dtype}, torch {torch.__version__}, HF_QAT_BACKEND={requested_backend()}, "
          f"AdamW {args.optimizer}, allocator environment {allocator or 'none (glibc defaults)'}")
    rows = []
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    def save(more: list[dict]) -> None:  # after each model (CUDA: each mode), so a run stopped early keeps its rows
        with open(args.out, "w") as fh:
            json.dump({"machine": machine, "dtype": str(dtype),
                       "backend": " ".join(args.backends or [requested_backend()]), "optimizer": args.optimizer,
                       "allocator_env": allocator, "results": rows + more}, fh, indent=2)

    for name in models:
        for label, implementation in variants(name, args.experts):
            model_rows = (measure_cuda(name, iters, implementation, args.optimizer, save) if device == "cuda" else
                          measure_cpu(name, iters, implementation, memory=args.memory, backends=args.backends,
                                      optimizer=args.optimizer))
            base = model_rows[0]
            for row in model_rows:
                row.setdefault("time_ratio", row["step_ms"] / base["step_ms"])  # CPU rows: paired with their FP steps
                row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"] if row["peak_bytes"] else None
                memory = f", peak {row['peak_bytes'] / 2**30:.2f} GiB (x{row['memory_ratio']:.3f})" if row["peak_bytes"] else ""
                engine = f" [{row['backend']}]" if row.get("backend") else ""
                print(f"{label:<24} {row['mode'] + engine:<24} {row['step_ms']:9.2f} ms/step (x{row['time_ratio']:.3f}){memory}")
            rows.extend(model_rows)
            save([])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
