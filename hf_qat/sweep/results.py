"""``runs.jsonl``: one JSON object per finished run, appended atomically.

A row is written with one ``write`` of a whole line on a file opened with O_APPEND, then fsync'ed,
so concurrent shards never interleave lines. A process killed in the middle of a write can leave at
most a partial last line without its newline: :func:`read_rows` drops it (and :func:`repair` cuts it
off the file) so the run is redone, never duplicated or read corrupt.
"""

from __future__ import annotations

import json
import os

RUNS_NAME = "runs.jsonl"
ROW_KEYS = ("key", "num_params", "fp_tokens", "qat_tokens", "bits", "loss", "schedule", "size", "budget", "fraction",
            "eval_tokens", "seed", "seconds", "hf_qat_version")


def repair(path: str) -> int:
    """Cut a partial last line (no trailing newline) off ``path``; returns the bytes removed."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        fh.truncate(keep)
        return len(data) - keep


def read_rows(path: str) -> list[dict]:
    """The complete rows of ``path`` (a partial last line is ignored); raises on a corrupt middle line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    if not data.endswith(b"\n"):
        lines = lines[:-1]
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path} line {number} is not JSON: the file was edited or corrupted") from None
    return rows


def append_row(path: str, row: dict) -> None:
    """Append ``row`` as one line, in one write, and fsync it."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"a sweep row lacks {', '.join(missing)}")
    line = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path} ({written} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)
