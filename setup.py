"""Installs hf_qat (its Triton kernels are hf_qat/kernels/) and its console script `hf-qat`.

No folder at the top of the repository may be named like a package transformers imports: the Hugging Face
`kernels` package (a transformers dependency since 5.25) is shadowed by any `kernels` folder or module on
sys.path, which breaks `import transformers` from the repository root. model_cards/ (the Jinja templates of
exported checkpoints' README.md) lives at the top and is installed as `hf_qat.model_cards`.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["hf_qat", "hf_qat.*"]) + ["hf_qat.model_cards"]

setup(
    name="hf_qat",
    version="0.4.0",
    description="Compute-optimal quantization-aware training for Hugging Face Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"hf_qat.model_cards": "model_cards"},
    package_data={"hf_qat.model_cards": ["*.jinja"]},
    install_requires=[
        # torch is not pinned here: install the build for your hardware first (README).
        "torch>=2.4",
        "transformers>=5.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=0.30",
        "numpy",
        "scipy>=1.10",
        "pyyaml",
        "jinja2",
        "tqdm",
        "rich",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "export": ["compressed-tensors>=0.20", "gguf>=0.17"],
        "peft": ["peft>=0.15"],
        "data": ["datasets>=3.0"],
        "plot": ["matplotlib>=3.7"],
        "dev": [
            "pytest>=8",
            "triton>=3.0",
            "compressed-tensors>=0.20",
            "gguf>=0.17",
            "peft>=0.15",
            "datasets>=3.0",
            "matplotlib>=3.7",
            "trl>=1.16,<2",
            "liger-kernel>=0.8,<0.9",
            # llama.cpp for the tests (tests/llama_runtime.py): a prebuilt CPU wheel, pinned; on a glibc older
            # than 2.38 the README's test command rebinds its C23 parsers (pyelftools reads the ELF files), and
            # builds llama-cpp-python where even that does not load
            'llama-cpp-py-sync==0.11739; platform_system == "Linux" and platform_machine == "x86_64"',
            "pyelftools>=0.31",
        ],
    },
    entry_points={"console_scripts": ["hf-qat=hf_qat.cli:main"]},
)
