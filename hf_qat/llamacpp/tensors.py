"""llama.cpp's tensor names for a transformers model: which GGUF tensors the writer makes of each state-dict
tensor (a fused expert stack included), whether a tied LM head is written, and the hyperparameters
llama.cpp's quantizer reads. The GGUF writer (:mod:`hf_qat.export.gguf`) and the file-type planner
(:mod:`hf_qat.model.file_type`) both name tensors here, so the types a file type gives and the tensors written agree.
"""

from __future__ import annotations

from torch import nn

from ..expert_layout import linear_dims, projections
from .architectures import GGUFArchitecture, architecture, num_experts
from .file_types import MixModel

STACKED = {"gate": "FFN_GATE_EXP", "up": "FFN_UP_EXP", "down": "FFN_DOWN_EXP"}  # projection -> gguf.MODEL_TENSOR


def expert_tensor_names(key: str) -> list[str]:
    """The llama.cpp tensors of the fused expert stack ``key`` (``...layers.<i>.mlp.experts.<parameter>``), one
    per projection it holds, in its row order (:func:`hf_qat.expert_layout.projections`: ``gate_up_proj`` as
    ``ffn_gate_exps`` then ``ffn_up_exps``, ``down_proj`` as ``ffn_down_exps``); [] for a parameter llama.cpp
    has no stack for."""
    import gguf

    block = int(key.split(".layers.")[1].split(".")[0])
    parameter = key.removesuffix(".weight").rsplit(".", 1)[-1]
    return [gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, STACKED[p])].format(bid=block) + ".weight"
            for p in projections(parameter) if p in STACKED]


def is_expert_stack(key: str, shape: tuple[int, ...]) -> bool:
    """Whether the state-dict tensor ``key`` is a fused expert stack ``[E, out, in]``."""
    return ".mlp.experts." in key and len(shape) == 3


def skips_head(arch: GGUFArchitecture, tied: bool) -> bool:
    """Whether the writer leaves out the LM head: a tied head, which llama.cpp reads from ``token_embd``,
    unless the architecture's graph requires its own ``output.weight``."""
    return tied and not arch.output_required


def is_tied(model: nn.Module) -> bool:
    """Whether the model's LM head shares its weight with the input embedding."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embedding is not None and head.weight is embedding.weight


def gguf_tensors(model: nn.Module, names: list[str], state: dict | None = None,
                 ) -> tuple[MixModel, list[tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``(MixModel, [(gguf name, ggml shape)], {weight name: gguf name})`` of the tensors the GGUF writer
    writes for the transformers ``model``: the weights ``names`` (in that order, the writer's) then every
    other tensor of ``state`` (the model's state dict by transformers' names; default ``model.state_dict()``);
    ggml shapes list the input dim first. Raises ExportFormatError for a model
    llama.cpp would not reproduce (:func:`~.architectures.architecture`)."""
    import gguf

    cfg = model.config
    arch = architecture(cfg)
    gguf_arch = getattr(gguf.MODEL_ARCH, arch.gguf_arch)
    tensor_names = gguf.get_tensor_name_map(gguf_arch, cfg.num_hidden_layers)
    state = model.state_dict() if state is None else state
    mix_model = MixModel(arch=gguf.MODEL_ARCH_NAMES[gguf_arch], n_layers=cfg.num_hidden_layers,
                         n_head=cfg.num_attention_heads,
                         n_head_kv=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                         n_expert=num_experts(cfg))
    tensors, by_weight = [], {}
    weight_keys = [f"{n}.weight" if f"{n}.weight" in state else n for n in names]
    skip_head = skips_head(arch, is_tied(model))
    for key in weight_keys + [k for k in state if k not in set(weight_keys)]:
        if skip_head and key == "lm_head.weight":
            continue
        transposed = is_expert_stack(key, tuple(state[key].shape)) and bool(
            getattr(model.get_submodule(key.rsplit(".", 1)[0]), "is_transposed", False))
        for name, shape in _ggml_tensors(key, tuple(state[key].shape), transposed, tensor_names):
            if name not in dict(tensors):
                tensors.append((name, shape))
                by_weight.setdefault(key.removesuffix(".weight"), name)
    return mix_model, tensors, by_weight


def _ggml_tensors(key: str, shape: tuple[int, ...], transposed: bool, tensor_names) -> list[tuple[str, tuple[int, ...]]]:
    """The GGUF tensors (name, ggml shape) the writer makes of the state-dict tensor ``key``: a fused expert
    stack (``[E, out, in]``, or ``[E, in, out]`` when ``transposed``) becomes llama.cpp's stacked tensors
    (:func:`expert_tensor_names`) of ``{in, out / projections, E}``."""
    if is_expert_stack(key, shape):
        experts, out, width = linear_dims(shape, transposed)
        names = expert_tensor_names(key)
        return [(name, (width, out // len(names), experts)) for name in names]
    name = tensor_names.get_name(key, try_suffixes=(".weight", ".bias"))
    return [] if name is None else [(name, tuple(reversed(shape)))]
