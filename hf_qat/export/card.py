"""The model card (README.md) of an export, rendered from ``model_cards/README.md.jinja`` through
huggingface_hub's ModelCard, with ``base_model_relation: quantized``."""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..bits import bits_label
from ..config import QATConfig
from ..quantizers import get_quantizer_class
from .base import ExportFormat, ExportInfo

FORMAT_LABELS = {
    "compressed-tensors": "compressed-tensors pack-quantized (transformers with `compressed-tensors`, vLLM)",
    "gguf": "GGUF (llama.cpp)",
    "bitnet": "transformers BitNet",
    "hf-qat": "the hf_qat native format",
}

USAGE = {
    "compressed-tensors": (
        "```python\nfrom transformers import AutoModelForCausalLM\n# pip install compressed-tensors\n"
        "model = AutoModelForCausalLM.from_pretrained(\"{repo}\")\n```\n\nvLLM: `vllm serve {repo}`"
    ),
    "gguf": "```bash\nllama-cli -m {gguf_file} -p \"Hello\"\n```",
    "bitnet": "```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"{repo}\")\n```",
    "hf-qat": (
        "```python\nimport hf_qat  # registers the hf_qat quantization method\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(\"{repo}\")\n```"
    ),
}


def _template_path() -> str:
    return str(resources.files("hf_qat.model_cards").joinpath("README.md.jinja"))


def _qat_rows(cfg: QATConfig | None) -> list[tuple[str, Any]]:
    if cfg is None:
        return []
    fixed_scale = get_quantizer_class(cfg.resolved_method).scale_dtype  # a block-scaled format's own (E8M0, E4M3)
    rows = [("weight bits", bits_label(cfg.bits)), ("quantizer", cfg.resolved_method), ("group size", cfg.group_size),
            ("scale dtype", cfg.scale_dtype if fixed_scale is None else str(fixed_scale).removeprefix("torch.")), ("activations", f"int{cfg.activation_bits} per token" if cfg.activation_bits else "full precision"),
            ("embeddings / LM head", f"{bits_label(cfg.embedding_bits)}-bit" if cfg.embedding_bits else "full precision"),
            ("fused cooldown", cfg.fuse_cooldown), ("start", cfg.start)]
    if cfg.pretrained_tokens:
        rows.append(("pretrained tokens (FP)", f"{cfg.pretrained_tokens:.4g}"))
    return rows


def _plan_rows(plan: dict | None) -> list[tuple[str, Any]]:
    if not plan:
        return []
    rows = []
    for key, label, fmt in (("strategy", "strategy", "{}"), ("qat_fraction", "optimal QAT fraction (of all tokens)", "{:.3f}"),
                            ("run_qat_fraction", "QAT share of this run", "{:.3f}"),
                            ("switch_step", "switch step", "{}"), ("total_steps", "total steps", "{}"),
                            ("tokens_per_param_byte", "tokens per parameter byte", "{:.4g}"),
                            ("total_tokens", "training tokens (this run)", "{:.4g}"),
                            ("predicted_loss", "predicted loss (fitted law)", "{:.4f}")):
        if plan.get(key) is not None:
            rows.append((label, fmt.format(plan[key])))
    return rows


def write_model_card(out_dir: str, fmt: ExportFormat, info: ExportInfo, cfg: QATConfig | None, plan: dict | None,
                     extra: dict[str, Any], base_model: str | None) -> str:
    """Render README.md into ``out_dir``; returns its file name."""
    repo = extra.get("repo_id", "path/to/this/folder")
    bits = bits_label(cfg.bits) if cfg else "low"
    tags = ["hf_qat", "qat", "quantized", f"{bits}-bit", *fmt.tags]
    data = ModelCardData(
        base_model=base_model, base_model_relation="quantized" if base_model else None, library_name=fmt.library_name,
        tags=tags, pipeline_tag="text-generation",
    )
    gguf_file = next((f for f in info.files if f.endswith(".gguf")), "model.gguf")
    eval_rows = [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in (extra.get("eval") or {}).items()]
    if extra.get("training_tokens"):
        eval_rows.insert(0, ("training tokens", f"{extra['training_tokens']:.4g}"))
    card = ModelCard.from_template(
        data, template_path=_template_path(),
        title=extra.get("title") or f"{bits}-bit QAT model" + (f" of {base_model}" if base_model else ""),
        description=extra.get("description", ""), format_label=FORMAT_LABELS.get(fmt.name, fmt.name),
        exact_text=("the loaded model computes exactly what the QAT model computed (up to the rounding of the matmul)."
                    if info.exact else "see the notes on exactness below."),
        usage=USAGE.get(fmt.name, "").format(repo=repo, gguf_file=gguf_file), needs_hf_qat=fmt.needs_hf_qat,
        qat_rows=_qat_rows(cfg), plan_rows=_plan_rows(plan), eval_rows=eval_rows, notes=info.notes,
        weight_bytes=info.weight_bytes,
    )
    card.save(os.path.join(out_dir, "README.md"))
    return "README.md"
