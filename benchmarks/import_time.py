"""What ``import hf_qat`` costs, from ``python -X importtime`` in fresh processes.

    python benchmarks/import_time.py [--repeats 5] [--out benchmarks/results/import_time.json]

Two figures, each the median over ``--repeats`` fresh interpreters:

* ``alone``: ``import hf_qat`` in a bare interpreter (torch and transformers included);
* ``own share``: ``import hf_qat`` after what every Trainer script imports anyway (torch, transformers, its
  Trainer, TrainingArguments and AutoModelForCausalLM): the cost hf_qat adds, its own modules and the
  dependencies only it pulls in.

Also prints the ten slowest modules hf_qat's own share imports (cumulative microseconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

PRELUDE = "import torch, transformers; from transformers import Trainer, TrainingArguments, AutoModelForCausalLM; "


def importtime(code: str) -> list[tuple[int, int, str]]:
    """``(self us, cumulative us, module)`` of every import ``code`` makes, in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                            check=True)
    rows = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            own, cumulative, name = line.removeprefix("import time:").split("|")
            rows.append((int(own), int(cumulative), name.rstrip()))
    return rows


def hf_qat_seconds(code: str) -> tuple[float, list[tuple[int, int, str]]]:
    """The cumulative seconds of the top-level ``hf_qat`` import in ``code``, and the imports inside it."""
    rows = importtime(code)
    top = next(i for i, row in enumerate(rows) if row[2].strip() == "hf_qat" and not row[2].startswith("  "))
    depth = len(rows[top][2]) - len(rows[top][2].lstrip())
    start = top
    while start > 0 and len(rows[start - 1][2]) - len(rows[start - 1][2].lstrip()) > depth:
        start -= 1  # importtime prints a module after the modules it imported
    return rows[top][1] / 1e6, rows[start:top]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/import_time.json")
    args = parser.parse_args()
    alone = [hf_qat_seconds("import hf_qat")[0] for _ in range(args.repeats)]
    runs = [hf_qat_seconds(PRELUDE + "import hf_qat") for _ in range(args.repeats)]
    own = [seconds for seconds, _ in runs]
    slowest = sorted(runs[-1][1], key=lambda row: -row[1])[:10]
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "repeats": args.repeats,
              "alone_s": statistics.median(alone), "own_share_s": statistics.median(own),
              "slowest_in_own_share": [{"module": name.strip(), "cumulative_us": cum} for _, cum, name in slowest]}
    print(f"import hf_qat alone: {result['alone_s']:.2f} s; hf_qat's own share after a Trainer script's imports: "
          f"{result['own_share_s']:.3f} s (median of {args.repeats})")
    for row in result["slowest_in_own_share"]:
        print(f"  {row['cumulative_us'] / 1e3:8.1f} ms  {row['module']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
