"""Weight fake-quant throughput: GB/s and fraction of the device's measured copy bandwidth.

    python benchmarks/kernel_speed.py [--shapes real|small] [--dtype bf16] [--family lsq|mxfp4|nvfp4]
                                      [--out benchmarks/results/kernels.json]

For each weight shape (real models: 576x1536, 2048x8192, 4096x14336) and 4-bit LSQ in groups of 32 (or MXFP4,
NVFP4 in their blocks), times forward and forward+backward of:
  * torch eager: the PyTorch reference (hf_qat.quantizers.reference) through the autograd Function
  * on a CPU, hf_qat's compiled engine (HF_QAT_BACKEND=compiled: that reference compiled by TorchInductor)
  * on a GPU, torch.compile of the reference, torchao's IntxFakeQuantizer on the same grid (int4, symmetric,
    group 32; LSQ only) if torchao is installed, and the Triton kernels (hf_qat.kernels)
Bytes counted: forward reads W and writes W_q (4 bytes per bf16 weight); forward+backward adds reading
the gradient and W and writing the weight gradient (10 bytes per weight). Scale tensors are ignored.
On a CPU the script runs the small shapes unless ``--shapes real``.

(Named kernel_speed.py, not kernels.py: running a script in benchmarks/ puts this folder on sys.path, where
a kernels.py would shadow the Hugging Face kernels package that transformers imports.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

REAL_SHAPES = [(576, 1536), (2048, 8192), (4096, 14336)]
SMALL_SHAPES = [(64, 256), (128, 512)]


def timer(fn, iters: int, device: str) -> float:
    """Median seconds per call."""
    import statistics
    import time

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device: str, dtype: torch.dtype, iters: int) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = (256 << 20) // torch.empty((), dtype=dtype).element_size() if device == "cuda" else 1 << 22
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src), iters, device)
    return 2 * src.numel() * src.element_size() / seconds


def methods(spec, device: str):
    """name -> (forward(w, s), forward_backward(w, s, g)) callables; missing methods are skipped."""
    from hf_qat.kernels.dispatch import weight_fake_quant

    def with_backend(backend):
        def forward(w, s):
            os.environ["HF_QAT_BACKEND"] = backend
            with torch.no_grad():
                return weight_fake_quant(w, s, spec)

        def forward_backward(w, s, g):
            os.environ["HF_QAT_BACKEND"] = backend
            w.grad = s.grad = None
            weight_fake_quant(w, s, spec).backward(g)

        return forward, forward_backward

    out = {"torch eager": with_backend("torch")}
    if device == "cpu":
        from hf_qat.kernels.compiled_engine import CompiledEngine

        reason = CompiledEngine().refusal(torch.zeros(1))
        if reason is None:
            out["compiled (hf_qat)"] = with_backend("compiled")
        else:
            print(f"the compiled engine {reason}; skipping it")
    if device == "cuda":
        fwd, fwd_bwd = with_backend("torch")
        out["torch.compile"] = (torch.compile(fwd), torch.compile(fwd_bwd))
        out["triton (hf_qat)"] = with_backend("triton")
        if not spec.grid.magnitudes:  # torchao's IntxFakeQuantizer is an integer grid
            try:
                from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

                quantizer = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)).to(device)

                def ao_forward(w, s):
                    with torch.no_grad():
                        return quantizer(w)

                def ao_forward_backward(w, s, g):
                    w.grad = None
                    quantizer(w).backward(g)

                out["torchao IntxFakeQuantizer"] = (ao_forward, ao_forward_backward)
            except ImportError as err:
                print(f"torchao not available ({err}); skipping it")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", choices=["real", "small"], default=None)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--family", default="lsq", choices=["lsq", "mxfp4", "nvfp4"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels.json"))
    args = parser.parse_args()
    from hf_qat.quantizers import ScaleLayout, get_quantizer
    from hf_qat.quantizers.reference import WeightQuantSpec

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = REAL_SHAPES if (args.shapes or ("real" if device == "cuda" else "small")) == "real" else SMALL_SHAPES
    quantizer = get_quantizer(args.family, 4)
    group = quantizer.block_size or 32
    bandwidth = copy_bandwidth(device, dtype, args.iters)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(f"{machine}: measured copy bandwidth {bandwidth / 1e9:.0f} GB/s ({args.dtype})")
    rows = []
    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype).requires_grad_(True)
        s = quantizer.init_scale(ScaleLayout(group).scale_view(w.detach().float())).to(dtype).requires_grad_(True)
        g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        spec = WeightQuantSpec(quantizer.grid(), group, quantizer.scale_dtype or torch.float16,
                               quantizer.grad_scale(w.numel(), s.numel(), "paretoq"))
        numel, size = w.numel(), w.element_size()
        for name, (forward, forward_backward) in methods(spec, device).items():
            t_f = timer(lambda: forward(w, s), args.iters, device)
            t_fb = timer(lambda: forward_backward(w, s, g), args.iters, device)
            row = {"shape": list(shape), "method": name,
                   "forward_ms": t_f * 1e3, "forward_GBps": 2 * numel * size / t_f / 1e9,
                   "fwd_bwd_ms": t_fb * 1e3, "fwd_bwd_GBps": 5 * numel * size / t_fb / 1e9}
            row["forward_frac_copy"] = row["forward_GBps"] * 1e9 / bandwidth
            row["fwd_bwd_frac_copy"] = row["fwd_bwd_GBps"] * 1e9 / bandwidth
            rows.append(row)
            print(f"{shape[0]}x{shape[1]:<6} {name:<28} fwd {row['forward_ms']:8.3f} ms {row['forward_GBps']:7.1f} GB/s "
                  f"({row['forward_frac_copy']:.0%})  fwd+bwd {row['fwd_bwd_ms']:8.3f} ms {row['fwd_bwd_GBps']:7.1f} GB/s "
                  f"({row['fwd_bwd_frac_copy']:.0%})")
    os.environ.pop("HF_QAT_BACKEND", None)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "dtype": args.dtype, "family": args.family, "copy_GBps": bandwidth / 1e9,
                   "results": rows}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
