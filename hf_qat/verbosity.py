"""hf_qat's own log lines (the coverage line, the plan, "QAT switched on") shown under a plain Trainer run.

Python prints a library's INFO lines only when the application configures logging, which a script that
builds a Trainer rarely does; transformers gives its own logger a handler for that reason, and hf_qat does
the same for the ``hf_qat`` logger: INFO and above go to stderr by default. ``HF_QAT_VERBOSITY`` (debug,
info, warning, error, critical) or :func:`set_verbosity` change the level (``warning`` silences the INFO
lines). When the application has configured logging itself (a handler on the root logger, as
``logging.basicConfig`` or pytest add), this handler stays quiet and the lines reach the application's
handlers once. Under several processes only rank 0 prints the INFO lines, as the Trainer does.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "hf_qat"
ENV_VAR = "HF_QAT_VERBOSITY"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL, "warn": logging.WARNING}  # "warn": logging's own alias of warning

__all__ = ["ENV_VAR", "LEVELS", "get_verbosity", "set_verbosity"]


class _DefaultHandler(logging.StreamHandler):
    """stderr at the time of each record (so redirections apply), unless the application has its own handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the application configured logging: the record propagates to its handlers
        if record.levelno < logging.WARNING and os.environ.get("RANK", "0") != "0":
            return
        self.setStream(sys.stderr)
        super().emit(record)


def _level(level: int | str, source: str) -> int:
    if isinstance(level, str) and level.strip().lower() in LEVELS:
        return LEVELS[level.strip().lower()]
    if isinstance(level, int) and not isinstance(level, bool) and level in LEVELS.values():
        return level
    raise ValueError(f"{source}={level!r} is not allowed; allowed: {', '.join(LEVELS)} (or logging.INFO, ...)")


def set_verbosity(level: int | str) -> None:
    """The level of hf_qat's log lines: "debug", "info" (the default), "warning", "error", "critical", or the
    ``logging`` constant."""
    logging.getLogger(LOGGER_NAME).setLevel(_level(level, "set_verbosity(level)"))


def get_verbosity() -> int:
    return logging.getLogger(LOGGER_NAME).getEffectiveLevel()


def _configure() -> None:
    """At import: the default handler, and the level from ``HF_QAT_VERBOSITY`` (info when unset) unless the
    application already set one."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(handler, _DefaultHandler) for handler in logger.handlers):
        handler = _DefaultHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(_level(os.environ.get(ENV_VAR, "info"), ENV_VAR))


_configure()
