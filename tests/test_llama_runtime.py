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
