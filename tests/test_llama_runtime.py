"""tests/llama_runtime.py, the tests' access to llama.cpp: without a binding that loads, the tests that need
llama.cpp skip, except under CI=true, where they fail (CI must not pass without having run them)."""

from __future__ import annotations

import pytest

import llama_runtime


def test_no_llama_cpp_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.setattr(llama_runtime, "_binding", lambda wanted: "no llama.cpp binding loads (...)")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no llama.cpp binding loads"):
        llama_runtime.runtime()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and no llama.cpp binding loads"):
        llama_runtime.runtime()


def test_an_unknown_runtime_name_is_refused(monkeypatch):
    monkeypatch.setenv("HF_QAT_LLAMA_RUNTIME", "llama_cpp")
    with pytest.raises(ValueError, match="llama-cpp-python, llama-cpp-py-sync"):
        llama_runtime.runtime()


def test_adapting_llama_cpp_py_sync_to_an_older_glibc(tmp_path):
    """On a copy of the installed llama-cpp-py-sync libraries, as Debian 12's glibc 2.36 sees them: afterwards
    no undefined symbol asks for a glibc above 2.36 and every such version need is weak; a second run changes
    nothing; a glibc too old for what else the libraries need is refused, changing nothing."""
    import importlib.util
    import shutil
    from pathlib import Path

    from elftools.elf.elffile import ELFFile

    spec = importlib.util.find_spec("llama_cpp_py_sync")
    if spec is None:
        llama_runtime.unavailable("llama-cpp-py-sync (the dev extra's) is not installed")
    folder = tmp_path / "libs"
    shutil.copytree(next(iter(spec.submodule_search_locations)), folder, symlinks=True)
    old = (2, 36)
    llama_runtime.adapt_to_older_glibc(folder, old)
    libraries = sorted(p for p in folder.glob("*.so*") if not p.is_symlink())
    assert any(p.name.startswith("libllama") for p in libraries)
    for path in libraries:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            verneed, versym = elf.get_section_by_name(".gnu.version_r"), elf.get_section_by_name(".gnu.version")
            auxes = {aux["vna_other"]: aux for _, entries in verneed.iter_versions() for aux in entries}
            for aux in auxes.values():
                if aux.name.startswith("GLIBC_2.") and tuple(map(int, aux.name[6:].split("."))) > old:
                    assert aux["vna_flags"] & 2, (path.name, aux.name)  # weak
            for i, sym in enumerate(elf.get_section_by_name(".dynsym").iter_symbols()):
                index = versym.get_symbol(i)["ndx"]
                aux = auxes.get(index & 0x7FFF) if isinstance(index, int) else None
                if sym["st_shndx"] == "SHN_UNDEF" and aux is not None and aux.name.startswith("GLIBC_2."):
                    assert tuple(map(int, aux.name[6:].split("."))) <= old, (path.name, sym.name, aux.name)
                assert not (sym.name.startswith("__isoc23_") and sym["st_shndx"] == "SHN_UNDEF"), (path.name, sym.name)
    before = {p.name: p.read_bytes() for p in libraries}
    assert llama_runtime.adapt_to_older_glibc(folder, old) == []
    with pytest.raises(RuntimeError, match=r"needs GLIBC_2\.\d+.* beyond the C23 parsers"):
        llama_runtime.adapt_to_older_glibc(folder, (2, 17))
    assert {p.name: p.read_bytes() for p in libraries} == before
