"""The registry of export formats (name -> :class:`~hf_qat.export.base.ExportFormat` subclass).

It sits below everything that names a format, so that naming one never imports the exporters:
``QATConfig.export_format`` is validated against it, and :func:`check_target` checks a model just prepared
for QAT through it. The formats register themselves (``@register_format``) when :mod:`hf_qat.export` is
imported, which ``import hf_qat`` does. docs/architecture.md has the recipe for a new format.
"""

from __future__ import annotations

FORMATS: dict[str, type] = {}


def register_format(cls: type) -> type:
    """Add an export format under ``cls.name`` (a name already taken is refused)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in FORMATS and FORMATS[cls.name] is not cls:
        raise ValueError(f"an export format named {cls.name!r} is already registered ({FORMATS[cls.name].__name__})")
    FORMATS[cls.name] = cls
    return cls


def check_target(model, name: str) -> None:
    """``QATConfig.export_format``: the QAT layers just installed in ``model``, checked against the format
    ``name`` before training (:meth:`~hf_qat.export.base.ExportFormat.check_prepared`)."""
    FORMATS[name].check_prepared(model)
