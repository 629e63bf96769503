"""The quantizer registry: a name -> Quantizer subclass map, and ``register_quantizer`` to extend it.

Example (a custom family is a Grid and a scale-init rule; the reference math and the kernels need
nothing more)::

    from hf_qat.quantizers import Quantizer, register_quantizer, lsq_grid

    @register_quantizer("lsq_mean")
    class MeanInitLSQ(Quantizer):
        supported_bits = (4, 8)
        def grid(self):
            return lsq_grid(self.bits)
        def init_scale(self, groups):            # [R, n_groups, G] -> [R, n_groups]
            return 2 * groups.abs().mean(-1) / self.grid().qp_int ** 0.5

    QATConfig(bits=4, method="lsq_mean")
"""

from __future__ import annotations

from typing import Callable, TypeVar

from ..errors import QATConfigError
from .family import Quantizer

_REGISTRY: dict[str, type[Quantizer]] = {}

Q = TypeVar("Q", bound=type[Quantizer])


def register_quantizer(name: str, *, override: bool = False) -> Callable[[Q], Q]:
    """Class decorator: register a :class:`Quantizer` subclass under ``name``.

    Registering a name twice is an error unless ``override=True`` (the same class again is a no-op,
    so modules can be re-imported).
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a quantizer name must be a non-empty string other than 'auto', got {name!r}")

    def decorate(cls: Q) -> Q:
        if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
            raise TypeError(f"register_quantizer({name!r}) decorates a Quantizer subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and not override:
            if existing.__qualname__ != cls.__qualname__ or existing.__module__ != cls.__module__:
                raise ValueError(f"quantizer {name!r} is already registered ({existing.__qualname__})")
        if not cls.supported_bits:
            raise ValueError(f"quantizer {name!r} must declare supported_bits")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_quantizers() -> list[str]:
    """The registered names, in registration order."""
    return list(_REGISTRY)


def get_quantizer_class(name: str) -> type[Quantizer]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QATConfigError("method", name, ", ".join(["auto", *_REGISTRY])) from None


def family_of_ggml_type(ggml_type: str) -> tuple[str, float, int] | None:
    """``(method, bits, group_size)`` of the family that trains llama.cpp's GGML type ``ggml_type`` (the first
    registered one that declares it in ``llama_cpp_types``), or None when none does."""
    return next(((name, *cls.llama_cpp_types[ggml_type]) for name, cls in _REGISTRY.items()
                 if ggml_type in cls.llama_cpp_types), None)


def get_quantizer(name: str, bits: float | int) -> Quantizer:
    """An instance of the family ``name`` at ``bits`` (raises QATConfigError if unsupported)."""
    return get_quantizer_class(name)(bits)
