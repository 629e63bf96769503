"""Reading the model's tensors from a Trainer checkpoint folder, in the model's own key names.

transformers 5 saves a model in its *original* checkpoint format (``save_pretrained`` reverts its weight
conversions): a mixture of experts' fused ``[E, ...]`` stacks are written as per-expert tensors, and
some modules are renamed (Mixtral: ``mlp`` -> ``block_sparse_moe``), the QAT units' keys included.
``from_pretrained`` converts them back; the Trainer's resume (5.24) loads the file with a plain
``load_state_dict``, which leaves every expert at its initial value with only a warning. hf_qat reads
checkpoints here, so that exporting or resuming one gives the model that was saved.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .unit import LEGACY_UNIT_KEYS, UNIT_KEY


def model_weight_files(directory: str) -> list[str]:
    """The model's own weight files in a checkpoint folder: those the index names, else
    ``model.safetensors``. Other safetensors there (a distilled run's ``hf_qat_teacher.safetensors``,
    a PEFT adapter, the QAT state of a PEFT run) are not the model's weights."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            return sorted(set(json.load(fh)["weight_map"].values()))
    if os.path.isfile(os.path.join(directory, "model.safetensors")):
        return ["model.safetensors"]
    raise FileNotFoundError(f"{directory} holds no model.safetensors (nor its index): not a model checkpoint")


def checkpoint_tensors(model: nn.Module, directory: str) -> dict[str, torch.Tensor]:
    """The tensors of the model's weight files that ``model`` knows by name: its own keys, and the QAT
    units' keys renamed back with transformers' renamings of this model (per-expert tensors, which
    only a conversion can merge, are left out)."""
    from safetensors.torch import load_file
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    known = set(model.state_dict())
    state = {}
    for name in model_weight_files(directory):
        for key, value in load_file(os.path.join(directory, name)).items():
            key = apply_renamings(key, renamings) if UNIT_KEY in key else key
            if key in known or UNIT_KEY in key or key.rsplit(".", 1)[-1] in LEGACY_UNIT_KEYS:
                state[key] = value
    return state


def restore_converted_weights(model: nn.Module, directory: str) -> list[str]:
    """After the Trainer loaded ``directory`` into ``model`` with a plain ``load_state_dict``: load what
    it could not place (the QAT units' renamed keys; tensors stored in the original per-expert format,
    read as ``from_pretrained`` converts them). Returns the names restored (none for a model whose
    checkpoint keys are its own)."""
    if not any(os.path.isfile(os.path.join(directory, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        return []  # another kind of checkpoint (an FSDP-sharded one): the Trainer's own loader read it
    state = checkpoint_tensors(model, directory)
    current = model.state_dict()
    placed = {current[k].data_ptr() for k in state if k in current}  # a tied tensor is saved once
    unplaced = [k for k in current if k not in state and current[k].data_ptr() not in placed]
    if unplaced:
        converted = type(model).from_pretrained(directory, dtype=next(model.parameters()).dtype).state_dict()
        state.update({k: converted[k] for k in unplaced if k in converted})
    restored = {k: state[k] for k in unplaced if k in state}
    restored.update({k: v for k, v in state.items() if UNIT_KEY in k})
    model.load_state_dict(restored, strict=False)
    return sorted(restored)
