"""hf_qat's version, where every module that records it (export manifests, sweep results) reads it
without importing the package's face (setup.py states the same number)."""

__version__ = "0.4.0"
