"""``run_sweep``: train a sweep's trunks and tails, append one row per finished run to runs.jsonl.

Layout of the output folder::

    DIR/runs.jsonl                   the rows (see results.py)
    DIR/sweep_config.json            the config the rows were trained with (checked on resume)
    DIR/sweep_data.json              how many training blocks its data has (fixed by the first invocation)
    DIR/cache/data-*.pt              the tokenized blocks
    DIR/trunks/SIZE-seedK/step-N.pt  trunk checkpoints at every branch point; fp-N.pt: FP rows' final models

Resuming: rows already in runs.jsonl are skipped; trunk checkpoints are reused (training restarts
from the latest one below the first missing branch point). Sharding: the runs are split into tasks
(an FP row with its PTQ rows is one task) and task ``i`` belongs to shard ``i % N``; every shard
trains the part of a trunk its own tails need. Under torchrun each rank takes the shard
``RANK/WORLD_SIZE`` unless ``shard`` is given.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..bits import normalize_bits
from ..model.convert import ptq
from ..version import __version__
from .config import SweepConfig, SweepConfigError
from .data import SweepData, data_file_name, load_sweep_data
from .engine import (build_model, check_size, device, evaluate, load_checkpoint, num_params, prepare_tail,
                     save_checkpoint, train_steps)
from .grid import RunSpec, branch_points, paper_fraction, plan_runs, token_accounting, trunk_multiplier
from .results import RUNS_NAME, append_row, read_rows, repair

CONFIG_NAME = "sweep_config.json"
DATA_NAME = "sweep_data.json"  # the training blocks of the folder's data (see _folder_train_blocks)
# Keys that may change between invocations on the same folder (they add or drop grid points).
GRID_KEYS = ("budgets", "bits", "method", "fractions", "schedules", "extra", "sizes")


@dataclass
class SweepSummary:
    """What one invocation did. Token counts are for the whole grid (all shards)."""

    rows_total: int
    rows_done_before: int
    rows_written: int = 0
    trained_tokens: int = 0
    seconds: float = 0.0
    tokens: dict[str, int] = field(default_factory=dict)


def parse_shard(text: str | None) -> tuple[int, int]:
    """"I/N" -> (I, N) with 0 <= I < N; None -> the torchrun rank and world size, or (0, 1)."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        index, count = (int(p) for p in str(text).split("/"))
    except ValueError:
        raise SweepConfigError("--shard", text, "I/N with integers 0 <= I < N") from None
    if not 0 <= index < count:
        raise SweepConfigError("--shard", text, "I/N with integers 0 <= I < N")
    return index, count


def _load_config(config: SweepConfig | dict | str | os.PathLike) -> SweepConfig:
    if isinstance(config, SweepConfig):
        return config
    if isinstance(config, dict):
        return SweepConfig.from_dict(config)
    return SweepConfig.from_yaml(config)


def _check_saved_config(config: SweepConfig, out_dir: str) -> dict:
    """Refuse to mix rows trained under other settings in one folder (grid keys may change); returns
    the config to save (the sizes of the folder and of ``config`` together)."""
    path = os.path.join(out_dir, CONFIG_NAME)
    current = json.loads(json.dumps(config.to_dict(), default=str))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        for key, value in current.items():
            if key not in GRID_KEYS and key in saved and saved[key] != value:
                raise SweepConfigError(key, value, f"{saved[key]!r}, the value the rows in {out_dir} were trained "
                                       "with", detail="use another --out folder for other settings")
        for name, overrides in current["sizes"].items():
            if name in saved.get("sizes", {}) and saved["sizes"][name] != overrides:
                raise SweepConfigError(f"sizes.{name}", overrides, f"{saved['sizes'][name]!r} (as trained in {out_dir})")
        current["sizes"] = {**saved.get("sizes", {}), **current["sizes"]}
    return current


def _folder_train_blocks(config: SweepConfig, out_dir: str, needed_blocks: int) -> int:
    """The training blocks of the folder's data.

    The tokenized data, its tokenizer included, depends on how many training blocks the grid needs
    (its largest budget): the first invocation records that number in ``DATA_NAME`` and every later
    one reuses it (run_sweep writes it once both checks passed), so a shrunk grid reads the same data, and a grid whose largest budget needs more
    blocks is refused (its trunks and rows would mix two data sets)."""
    path = os.path.join(out_dir, DATA_NAME)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            train_blocks = json.load(fh)["train_blocks"]
    else:
        train_blocks = _legacy_train_blocks(config, out_dir, needed_blocks)
    if needed_blocks > train_blocks:
        largest = max(budget for grid in config.grids for budget in grid.budgets)
        raise SweepConfigError(
            "budgets", largest, f"budgets whose longest run takes at most {train_blocks // config.batch_size} steps "
            f"({train_blocks} training blocks: the data the rows in {out_dir} were trained on)",
            detail="the tokenized data and its tokenizer depend on the largest budget; a larger one needs another "
                   "--out folder")
    return train_blocks


def _legacy_train_blocks(config: SweepConfig, out_dir: str, needed_blocks: int) -> int:
    """The training blocks of a folder that does not record them (new, or written by hf_qat < 0.4):
    the grid's own number when its data is the cached one (or nothing is cached), else refused."""
    cache = os.path.join(out_dir, "cache")
    cached = sorted(f for f in os.listdir(cache) if f.startswith("data-") and f.endswith(".pt")) if os.path.isdir(cache) else []
    if cached and data_file_name(config, needed_blocks) not in cached:
        raise SweepConfigError("budgets", [b for grid in config.grids for b in grid.budgets],
                               f"the budgets the rows in {out_dir} were trained with (its cached data {cached[0]} was "
                               "tokenized for another largest budget)", detail="use another --out folder")
    return needed_blocks


def _write_json_atomically(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # shards may write at the same moment
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def _tasks(runs: list[RunSpec]) -> list[list[RunSpec]]:
    """Runs grouped into units of work: an FP row with the PTQ rows of its model; every other run alone."""
    tasks: dict[tuple, list[RunSpec]] = {}
    for run in runs:
        key = (run.size, run.seed, run.budget, "fp") if run.schedule in ("fp", "ptq") else (run.key,)
        tasks.setdefault(key, []).append(run)
    for task in tasks.values():
        task.sort(key=lambda r: r.schedule != "fp")  # the fp row first
    return list(tasks.values())


class _Sweep:
    """The state of one invocation (config, data, output paths, progress)."""

    def __init__(self, config: SweepConfig, out_dir: str, data: SweepData, bar: tqdm, log: Callable[[str], None],
                 save_models: bool = False):
        self.config, self.out_dir, self.data, self.bar, self.log = config, out_dir, data, bar, log
        self.save_models = save_models
        self.runs_path = os.path.join(out_dir, RUNS_NAME)
        self.trained_steps = 0
        self.rows_written = 0
        self.device = device()

    def trunk_path(self, size: str, seed: int, step: int) -> str:
        return os.path.join(self.out_dir, "trunks", f"{size}-seed{seed}", f"step-{step:07d}.pt")

    def model_path(self, run: RunSpec) -> str:
        return os.path.join(self.out_dir, "models", run.key.replace("/", "_") + ".pt")

    def fp_path(self, run: RunSpec) -> str:
        return os.path.join(self.out_dir, "trunks", f"{run.size}-seed{run.seed}", f"fp-{run.total_steps:07d}.pt")

    def _tick(self) -> None:
        self.trained_steps += 1
        self.bar.update(1)

    # ------------------------------------------------------------------ trunks
    def trunk_start(self, size: str, seed: int, needed: list[int]) -> int:
        """The step the trunk resumes from to provide the ``needed`` checkpoints (or max + 1: none missing)."""
        missing = [p for p in needed if not os.path.exists(self.trunk_path(size, seed, p))]
        if not missing:
            return max(needed, default=0) + 1
        below = [p for p in needed if p < missing[0] and os.path.exists(self.trunk_path(size, seed, p))]
        return max(below, default=0)

    def ensure_trunk(self, size: str, seed: int, needed: list[int], saved: list[int]) -> None:
        """Train the trunk of (size, seed) far enough to write every ``needed`` checkpoint (and the
        other branch points ``saved`` passed on the way)."""
        start = self.trunk_start(size, seed, needed)
        if start > max(needed, default=0):
            return
        model = build_model(self.config, size, seed, self.device)
        optimizer = prepare_tail(model, None, self.config)
        if start > 0 or os.path.exists(self.trunk_path(size, seed, 0)):
            load_checkpoint(self.trunk_path(size, seed, start), model, optimizer)
        else:
            save_checkpoint(self.trunk_path(size, seed, 0), 0, model, optimizer)
        order = self.data.order(seed)
        self.bar.set_postfix_str(f"trunk {size} seed {seed}")
        step = start
        for point in sorted(p for p in set(saved) | set(needed) if start < p <= max(needed)):
            train_steps(model, optimizer, self.data, order, self.config, trunk_multiplier(self.config), step, point,
                        on_step=self._tick)
            save_checkpoint(self.trunk_path(size, seed, point), point, model, optimizer)
            step = point

    # ------------------------------------------------------------------ tails
    def train_tail(self, run: RunSpec) -> tuple[torch.nn.Module, float]:
        """The model at the end of ``run`` (trained from its trunk checkpoint) and the seconds it took."""
        started = time.perf_counter()
        qat = self.config.qat_config(run.bits, run.method) if run.schedule in ("fused", "classic") else None
        model = build_model(self.config, run.size, run.seed, self.device)
        optimizer = prepare_tail(model, qat, self.config)
        load_checkpoint(self.trunk_path(run.size, run.seed, run.branch_step), model, optimizer)
        self.bar.set_postfix_str(run.key)
        train_steps(model, optimizer, self.data, self.data.order(run.seed), self.config, run.multiplier(self.config),
                    run.branch_step, run.total_steps, switch_step=run.switch_step if qat else None, on_step=self._tick)
        return model, time.perf_counter() - started

    def row(self, run: RunSpec, loss: float, seconds: float, counts: tuple[int, int | None]) -> dict[str, Any]:
        n, active = counts
        tps = self.config.tokens_per_step
        qat_tokens = run.qat_tokens(tps)
        tokens = run.total_steps * tps
        row = {"key": run.key, "num_params": n, "fp_tokens": tokens - qat_tokens, "qat_tokens": qat_tokens,
               "bits": run.bits, "method": run.resolved_method, "loss": loss, "schedule": run.schedule, "size": run.size, "budget": run.budget,
               "fraction": run.fraction, "eval_tokens": self.data.eval_tokens, "seed": run.seed,
               "seconds": round(seconds, 3), "hf_qat_version": __version__, "tokens": tokens,
               "total_steps": run.total_steps, "switch_step": run.switch_step, "branch_step": run.branch_step,
               "device": str(self.device)}
        if active is not None:
            row["active_params"] = active
        if run.bits is not None:
            row["tokens_per_param_byte"], row["paper_fraction"] = paper_fraction(n, tokens, run.bits)
        return row

    def finish(self, run: RunSpec, model: torch.nn.Module, seconds: float, counts: tuple[int, int | None]) -> None:
        """Evaluate the final model of ``run``, append its row (and save the model if asked)."""
        started = time.perf_counter()
        row = self.row(run, evaluate(model, self.data.eval), seconds + time.perf_counter() - started, counts)
        if self.save_models:
            save_checkpoint(self.model_path(run), run.total_steps, model, None)
        self.write(row)

    def write(self, row: dict[str, Any]) -> None:
        append_row(self.runs_path, row)
        self.rows_written += 1
        self.log(f"{row['key']}: loss {row['loss']:.4f} ({row['seconds']:.1f} s)")

    def needs_training(self, task: list[RunSpec], done: set[str]) -> bool:
        """False only for an FP task whose row is written and whose final model is on disk (PTQ rows left)."""
        first = task[0]
        return not (first.schedule == "fp" and first.key in done and os.path.exists(self.fp_path(first)))

    def run_task(self, task: list[RunSpec], done: set[str]) -> None:
        counts = num_params(self.config, task[0].size)
        first = task[0]
        if first.schedule != "fp":
            model, seconds = self.train_tail(first)
            self.finish(first, model, seconds, counts)
            return
        # The FP row, then PTQ of its final model at every bit width.
        if self.needs_training(task, done):
            model, seconds = self.train_tail(first)
            save_checkpoint(self.fp_path(first), first.total_steps, model, None)
            if first.key not in done:
                self.finish(first, model, seconds, counts)
        else:
            model = build_model(self.config, first.size, first.seed, self.device)
            load_checkpoint(self.fp_path(first), model, None)
        for run in task[1:]:
            if run.key in done:
                continue
            started = time.perf_counter()
            quantized = ptq(copy.deepcopy(model), self.config.qat_config(run.bits, run.method))
            self.finish(run, quantized, time.perf_counter() - started, counts)


def run_sweep(
    config: SweepConfig | dict | str | os.PathLike,
    out_dir: str | os.PathLike,
    shard: str | tuple[int, int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    save_models: bool = False,
) -> SweepSummary:
    """Run (or resume) a sweep into ``out_dir``: rows appended to ``out_dir/runs.jsonl``.

    Args:
        config: a SweepConfig, a dict of its keys or a YAML path.
        shard: "I/N" or (I, N): run only the tasks ``i % N == I``; None: the torchrun rank (or all).
        progress: show a progress bar (steps over the grid, with ETA).
        log: where status lines go (default: printed above the progress bar).
        save_models: also write every run's final model state to ``out_dir/models/``.
    """
    config = _load_config(config)
    out_dir = os.fspath(out_dir)
    index, count = shard if isinstance(shard, tuple) else parse_shard(shard)
    runs = plan_runs(config)
    for bits, method in sorted({(r.bits, r.method) for r in runs if r.bits is not None},
                               key=lambda pair: (float(pair[0]), pair[1])):
        for size in sorted({r.size for r in runs}):
            check_size(config, size, config.qat_config(normalize_bits(bits), method))
    os.makedirs(out_dir, exist_ok=True)
    saved = _check_saved_config(config, out_dir)
    train_blocks = _folder_train_blocks(config, out_dir, max(r.total_steps for r in runs) * config.batch_size)
    _write_json_atomically(os.path.join(out_dir, CONFIG_NAME), saved)  # only once both checks passed
    _write_json_atomically(os.path.join(out_dir, DATA_NAME), {"train_blocks": train_blocks})
    runs_path = os.path.join(out_dir, RUNS_NAME)
    repair(runs_path)
    done = {row["key"] for row in read_rows(runs_path)}
    summary = SweepSummary(rows_total=len(runs), rows_done_before=sum(r.key in done for r in runs),
                           tokens=token_accounting(runs, config.tokens_per_step))
    tasks = [t for i, t in enumerate(_tasks(runs)) if i % count == index]
    pending = [t for t in tasks if any(r.key not in done for r in t)]
    emit = log or tqdm.write
    tokens = summary.tokens
    emit(f"sweep: {len(runs)} rows ({summary.rows_done_before} done), shard {index}/{count}: {len(pending)} tasks to run; "
         f"the grid trains {tokens['branched_tokens'] / 1e6:.1f}M tokens branched vs {tokens['unbranched_tokens'] / 1e6:.1f}M "
         f"unbranched ({1 - tokens['branched_tokens'] / max(1, tokens['unbranched_tokens']):.0%} saved)")
    if not pending:
        return summary
    started = time.perf_counter()
    data = load_sweep_data(config, train_blocks, cache_dir=os.path.join(out_dir, "cache"))
    all_points = branch_points(runs)
    by_trunk: dict[tuple[str, int], list[list[RunSpec]]] = {}
    for task in pending:
        by_trunk.setdefault((task[0].size, task[0].seed), []).append(task)
    with tqdm(total=0, unit="step", desc="sweep", disable=not progress, dynamic_ncols=True) as bar:
        sweep = _Sweep(config, out_dir, data, bar, emit, save_models)
        plan = []
        for (size, seed), trunk_tasks in by_trunk.items():
            training = [t for t in trunk_tasks if sweep.needs_training(t, done)]
            needed = sorted({t[0].branch_step for t in training})
            start = sweep.trunk_start(size, seed, needed)
            trunk_steps = max(0, max(needed, default=0) - start)
            tail_steps = sum(t[0].tail_steps for t in training)
            plan.append((size, seed, trunk_tasks, needed))
            bar.total += trunk_steps + tail_steps
        bar.refresh()
        for size, seed, trunk_tasks, needed in plan:
            sweep.ensure_trunk(size, seed, needed, all_points[(size, seed)])
            for task in sorted(trunk_tasks, key=lambda t: t[0].branch_step):
                sweep.run_task(task, done)
    summary.rows_written = sweep.rows_written
    summary.trained_tokens = sweep.trained_steps * config.tokens_per_step
    summary.seconds = time.perf_counter() - started
    emit(f"sweep: {summary.rows_written} rows written; trained {summary.trained_tokens / 1e6:.2f}M tokens in "
         f"{summary.seconds:.0f} s (the same rows unbranched: {tokens['unbranched_tokens'] / 1e6:.1f}M tokens for the "
         "whole grid)")
    return summary


def train_unbranched(config: SweepConfig, run: RunSpec, data: SweepData) -> torch.nn.Module:
    """``run`` trained from step 0 without a trunk, as a user's single run would be (QAT layers
    installed dormant from the start, switched on at ``run.switch_step``): the reference that a
    branched tail must reproduce."""
    model = build_model(config, run.size, run.seed)
    if run.schedule == "ptq":
        raise ValueError("a ptq row is not trained: train its fp row and apply hf_qat.ptq")
    qat = config.qat_config(run.bits, run.method) if run.schedule in ("fused", "classic") else None
    optimizer = prepare_tail(model, qat, config)
    train_steps(model, optimizer, data, data.order(run.seed), config, run.multiplier(config), 0, run.total_steps,
                switch_step=run.switch_step if qat else None)
    return model
