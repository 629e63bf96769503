"""llama.cpp for the tests: run a GGUF file (its tokenizer, the logits of every position) and quantize one
with llama.cpp's own quantizer (``llama_model_quantize``), through whichever binding is installed:

- llama-cpp-python (``llama_cpp``), which users often have, built from source (0.3.36: llama.cpp 0c1e57098,
  ggml 0.25.3);
- llama-cpp-py-sync (``llama_cpp_py_sync``), the README's test command's first choice: a prebuilt CPU wheel of
  llama.cpp (0.11739: llama.cpp b11739, ggml 0.27.0) with CFFI bindings of its C API, called here directly;
  ``python tests/llama_runtime.py --adapt-glibc`` lets its library load on a glibc older than 2.38
  (:func:`adapt_to_older_glibc`).

llama-cpp-python is used where both are installed; ``HF_QAT_LLAMA_RUNTIME=llama-cpp-py-sync`` (or
``=llama-cpp-python``) picks one. Without either, the tests that need llama.cpp skip, except under
``CI=true``, where they fail: CI must not pass without having run them.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

RUNTIMES = {"llama-cpp-python": "llama_cpp", "llama-cpp-py-sync": "llama_cpp_py_sync"}  # pip name -> module
INSTALL = ("The README's test command installs one: llama-cpp-py-sync 0.11739 (a prebuilt wheel, built against glibc "
           "2.38; on an older glibc `python tests/llama_runtime.py --adapt-glibc` lets it load), else llama-cpp-python "
           "0.3.36 built from source.")


def runtime():
    """The llama.cpp binding the tests use (``name``, ``version``, ``load``, ``quantize``); skips the calling
    test without one, fails it under CI=true."""
    binding = _binding(os.environ.get("HF_QAT_LLAMA_RUNTIME"))
    if not isinstance(binding, str):
        return binding
    unavailable(binding)


def unavailable(why: str):
    """Skip the calling test for ``why``; fail it under CI=true (CI must not pass without having run it)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {why}", pytrace=False)
    pytest.skip(why)


@functools.cache
def ggml_library(*functions: str):
    """The ggml base library of the installed binding (``ctypes.CDLL``), with ``functions`` declared as
    ``(const void * src, void * dst, int64_t n)`` row converters (``dequantize_row_*``, ``quantize_row_*_ref``);
    skips the calling test without one, fails it under CI=true."""
    import ctypes

    binding = runtime()
    folder = Path(importlib.import_module(RUNTIMES[binding.name]).__file__).parent
    found = sorted(folder.rglob("libggml-base.so*"))
    if not found:
        unavailable(f"{binding.name} {binding.version} has no libggml-base.so under {folder}")
    lib = ctypes.CDLL(str(found[0]))
    for name in functions:
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


@functools.cache
def _binding(wanted: str | None):
    """The binding ``wanted`` (any when None), or why there is none."""
    if wanted is not None and wanted not in RUNTIMES:
        raise ValueError(f"HF_QAT_LLAMA_RUNTIME={wanted!r}: use one of {', '.join(RUNTIMES)}")
    missing = []
    for name, module in RUNTIMES.items():
        if wanted not in (None, name):
            continue
        try:
            return (LlamaCppPython if name == "llama-cpp-python" else LlamaCppPySync)(importlib.import_module(module))
        except (ImportError, OSError, RuntimeError) as error:  # not installed, or its library does not load
            missing.append(f"{name}: {error}")
    return f"no llama.cpp binding loads ({'; '.join(missing)}). {INSTALL}"


def quantize(f32_path, out_path, ftype: str, nthread: int = 0) -> int:
    """llama.cpp's ``llama_model_quantize`` of a GGUF file to the file type ``ftype`` (llama.cpp's enum name,
    e.g. ``"LLAMA_FTYPE_MOSTLY_Q4_K_M"``), on ``nthread`` threads (0: all); returns its status, 0 on success."""
    return runtime().quantize(str(f32_path), str(out_path), ftype, nthread)


def load(gguf_path, n_ctx: int):
    """A GGUF file loaded in llama.cpp, as a ``Model`` (a context manager)."""
    return runtime().load(str(gguf_path), n_ctx)


class Model:
    """One sequence in a llama.cpp context: ``eval`` appends tokens to it and returns their logits."""

    def tokenize(self, text: str) -> list[int]:
        """``text``'s token ids with the special tokens the model adds (BOS), special tokens not parsed."""
        raise NotImplementedError

    def eval(self, ids) -> np.ndarray:
        """The logits (len(ids), n_vocab) of ``ids`` appended to the tokens evaluated since ``reset``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the tokens evaluated: the next ``eval`` starts at position 0."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LlamaCppPython:
    """llama-cpp-python: its ``Llama`` (all logits kept) and its ctypes binding of the quantizer."""

    name = "llama-cpp-python"

    def __init__(self, llama_cpp):
        self.llama_cpp = llama_cpp
        self.version = llama_cpp.__version__

    def quantize(self, src: str, dst: str, ftype: str, nthread: int) -> int:
        import ctypes

        params = self.llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(self.llama_cpp, ftype)
        params.nthread = nthread
        return self.llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))

    def load(self, path: str, n_ctx: int) -> Model:
        return LlamaCppPythonModel(self.llama_cpp.Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False))


class LlamaCppPythonModel(Model):
    def __init__(self, llm):
        self.llm = llm

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True, special=False)

    def eval(self, ids) -> np.ndarray:
        start = self.llm.n_tokens
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[start:self.llm.n_tokens])

    def reset(self) -> None:
        self.llm.reset()

    def close(self) -> None:
        self.llm.close()


class LlamaCppPySync:
    """llama-cpp-py-sync's CFFI binding of llama.cpp's C API, called as llama-cpp-python's ``Llama`` calls it
    (the same context settings: flash attention off, n_batch = n_ctx, its thread counts)."""

    name = "llama-cpp-py-sync"

    def __init__(self, module):
        from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

        self.llama_cpp = module
        self.version = f"{module.__version__} (llama.cpp {module.__llama_cpp_tag__})"
        self.ffi, self.lib = get_ffi(), get_lib()
        self.lib.llama_backend_init()

    def quantize(self, src: str, dst: str, ftype: str, nthread: int) -> int:
        params = self.ffi.new("llama_model_quantize_params *", self.lib.llama_model_quantize_default_params())
        params.ftype = getattr(self.lib, ftype)
        params.nthread = nthread
        return self.lib.llama_model_quantize(src.encode(), dst.encode(), params)

    def load(self, path: str, n_ctx: int) -> Model:
        if not Path(path).is_file():
            raise FileNotFoundError(path)
        return LlamaCppPySyncModel(self.ffi, self.lib, path, n_ctx)


class LlamaCppPySyncModel(Model):
    def __init__(self, ffi, lib, path: str, n_ctx: int):
        self.ffi, self.lib = ffi, lib
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0  # llama-cpp-python's default: the CPU (a Metal wheel offloads all by default)
        self.model = lib.llama_model_load_from_file(path.encode(), model_params)
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_threads = max(multiprocessing.cpu_count() // 2, 1)
        params.n_threads_batch = multiprocessing.cpu_count()
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lib.llama_init_from_model(self.model, params)
        if self.ctx == ffi.NULL:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_ctx
        self.n_tokens = 0

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        size = len(data) + 2
        tokens = self.ffi.new("llama_token[]", size)
        n = self.lib.llama_tokenize(self.vocab, data, len(data), tokens, size, True, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens, more than the {size} given")
        return list(tokens[0:n])

    def eval(self, ids) -> np.ndarray:
        ids = list(ids)
        logits = []
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            batch = self.lib.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                for i, token in enumerate(chunk):
                    batch.token[i] = token
                    batch.pos[i] = self.n_tokens + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                status = self.lib.llama_decode(self.ctx, batch)
                if status != 0:
                    raise RuntimeError(f"llama_decode returned {status} at position {self.n_tokens}")
            finally:
                self.lib.llama_batch_free(batch)
            out = self.lib.llama_get_logits(self.ctx)
            size = len(chunk) * self.n_vocab
            logits.append(np.frombuffer(self.ffi.buffer(out, size * 4), dtype=np.float32).reshape(len(chunk), -1).copy())
            self.n_tokens += len(chunk)
        return np.concatenate(logits)

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self.n_tokens = 0

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


C23 = "__isoc23_"  # glibc 2.38's C23 number parsers (strtol, sscanf, ...) carry this prefix


def adapt_to_older_glibc(folder: Path, glibc: tuple[int, ...] | None = None) -> list[str]:
    """Let the libraries in ``folder`` (llama-cpp-py-sync's, built against glibc 2.38) load on an older glibc
    (``glibc``, default: this system's).

    Their only needs from 2.38 are C23's ``__isoc23_strtol``-style parsers (strtol, strtoul, strtoull, sscanf),
    which differ from the functions without the prefix in reading ``0b`` binary literals (and sscanf's ``%b``),
    which llama.cpp's decimal parsing never meets. Each undefined ``__isoc23_<f>`` that asks for a glibc newer
    than this one is bound to ``<f>`` instead (its name points 9 bytes further into the same string; its
    version becomes the default one), and the need for a glibc version no symbol requires any more is marked
    weak (``VER_FLG_WEAK``). Each edited library is written as a new file that replaces the old one (a
    hard-linked cache copy stays as it was). Raises RuntimeError, changing nothing, where a library needs
    anything else from a newer glibc. Returns one line per library edited (none when nothing needs it)."""
    import struct

    from elftools.elf.elffile import ELFFile

    system = glibc or tuple(int(p) for p in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split("."))

    def too_new(version: str) -> bool:
        return version.startswith("GLIBC_2.") and tuple(int(p) for p in version[6:].split(".")) > system

    plans = {}
    for path in sorted(p for p in folder.glob("*.so*") if not p.is_symlink()):
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            order = "<" if elf.little_endian else ">"
            dynsym, versym = elf.get_section_by_name(".dynsym"), elf.get_section_by_name(".gnu.version")
            verneed = elf.get_section_by_name(".gnu.version_r")
            if dynsym is None or versym is None or verneed is None:
                continue
            names = {aux["vna_other"]: aux.name for _, auxes in verneed.iter_versions() for aux in auxes}
            writes, rebound, used = [], 0, set()
            for i, sym in enumerate(dynsym.iter_symbols()):
                index = versym.get_symbol(i)["ndx"]
                version = names.get(index & 0x7FFF) if isinstance(index, int) else None  # bit 15: hidden
                if sym.name.startswith(C23) and sym["st_shndx"] == "SHN_UNDEF" and version and too_new(version):
                    writes.append((dynsym["sh_offset"] + i * dynsym["sh_entsize"], "I", sym["st_name"] + len(C23)))
                    writes.append((versym["sh_offset"] + 2 * i, "H", 1))  # VER_NDX_GLOBAL: the default version
                    rebound += 1
                elif version:
                    used.add(version)
            if still := sorted(v for v in used if too_new(v)):
                raise RuntimeError(f"{path.name} needs {', '.join(still)} beyond the C23 parsers: it cannot load on "
                                   f"glibc {'.'.join(map(str, system))}")
            position = verneed["sh_offset"]
            for need, auxes in verneed.iter_versions():
                at = position + need["vn_aux"]
                for aux in auxes:  # vna_flags sits 4 bytes into a Vernaux entry; 2 is VER_FLG_WEAK
                    if too_new(aux.name) and not aux["vna_flags"] & 2:
                        writes.append((at + 4, "H", aux["vna_flags"] | 2))
                    at += aux["vna_next"]
                position += need["vn_next"]
            if writes:
                plans[path] = (order, writes, rebound)
    for path, (order, writes, _) in plans.items():
        data = bytearray(path.read_bytes())
        for where, fmt, value in writes:
            struct.pack_into(order + fmt, data, where, value)
        fresh = path.with_name(path.name + ".adapting")
        fresh.write_bytes(bytes(data))
        os.chmod(fresh, path.stat().st_mode)
        os.replace(fresh, path)
    return [f"{path.name}: {rebound} C23 parsers rebound" for path, (_, _, rebound) in plans.items()]


if __name__ == "__main__":  # the README's test command: is a llama.cpp binding there, or must it be built?
    import argparse
    import importlib.util
    import sys

    parser = argparse.ArgumentParser(description="Which llama.cpp binding the tests will use (exit 1: none loads).")
    parser.add_argument("--adapt-glibc", action="store_true",
                        help="first let llama-cpp-py-sync's libraries load on a glibc older than 2.38 (see adapt_to_older_glibc)")
    args = parser.parse_args()
    if args.adapt_glibc:
        spec = importlib.util.find_spec("llama_cpp_py_sync")
        if spec is None:
            sys.exit("llama-cpp-py-sync is not installed")
        try:
            print("\n".join(adapt_to_older_glibc(Path(next(iter(spec.submodule_search_locations)))))
                  or "llama-cpp-py-sync: nothing to adapt")
        except RuntimeError as error:
            sys.exit(str(error))
    found = _binding(os.environ.get("HF_QAT_LLAMA_RUNTIME"))
    print(f"llama.cpp for the tests: {found}" if isinstance(found, str) else
          f"llama.cpp for the tests: {found.name} {found.version}")
    sys.exit(isinstance(found, str))
