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

from ..errors import QATModelError
from ..model.distributed import is_dtensor
from ..model.unit import LEGACY_UNIT_KEYS, UNIT_KEY


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


def _renamings(model: nn.Module) -> list:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]


def _model_key(key: str, renamings: list) -> str:
    """A file key in the model's naming: the units' keys renamed back (the model's own keys as they are)."""
    from transformers.core_model_loading import apply_renamings

    return apply_renamings(key, renamings) if UNIT_KEY in key else key


def checkpoint_tensors(model: nn.Module, directory: str, wanted: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the model's weight files that ``model`` knows by name (or only those in
    ``wanted``): its own keys, and the QAT units' keys renamed back with transformers' renamings of this
    model (per-expert tensors, which only a conversion can merge, are left out)."""
    from safetensors import safe_open

    renamings = _renamings(model)
    known = set(model.state_dict())
    state = {}
    for name in model_weight_files(directory):
        with safe_open(os.path.join(directory, name), "pt") as fh:
            for key in fh.keys():
                target = _model_key(key, renamings)
                if wanted is not None and target not in wanted:
                    continue
                if target in known or UNIT_KEY in key or key.rsplit(".", 1)[-1] in LEGACY_UNIT_KEYS:
                    state[target] = fh.get_tensor(key)
    return state


def restore_converted_weights(model: nn.Module, directory: str) -> list[str]:
    """After the Trainer loaded ``directory`` into ``model`` with a plain ``load_state_dict``: load what
    it could not place (QAT units' keys that ``save_pretrained`` renamed; tensors stored in the original
    per-expert format, read as ``from_pretrained`` converts them). Returns the names loaded: none, and
    nothing read but the files' key names, for a checkpoint whose keys are the model's own. Raises
    naming the keys when some cannot be placed even so (the resume would not be exact)."""
    from safetensors import safe_open

    files = [f for f in ("model.safetensors", "model.safetensors.index.json") if os.path.isfile(os.path.join(directory, f))]
    if not files or any(is_dtensor(p) for p in model.parameters()):
        return []  # another kind of checkpoint, or FSDP2: the Trainer's own loader read it
    renamings = _renamings(model)
    stored: dict[str, str] = {}  # model key -> file key
    for name in model_weight_files(directory):
        with safe_open(os.path.join(directory, name), "pt") as fh:
            stored.update({_model_key(key, renamings): key for key in fh.keys()})
    current = model.state_dict()
    placed = {current[k].data_ptr() for k in stored if k in current}  # a tied tensor is saved once
    unplaced = {k for k in current if k not in stored and current[k].data_ptr() not in placed}
    renamed = {k for k, key in stored.items() if k != key and k in current}
    if not unplaced and not renamed:
        return []
    state = checkpoint_tensors(model, directory, wanted=unplaced | renamed)
    missing = unplaced - set(state)
    if missing:
        converted = type(model).from_pretrained(directory, dtype=next(model.parameters()).dtype).state_dict()
        state.update({k: converted[k] for k in missing if k in converted})
    not_loaded = sorted(unplaced - set(state))
    if not_loaded:
        raise QATModelError(f"{directory} does not hold {len(not_loaded)} tensors of this model, even in its original "
                            f"format: {not_loaded[:3]}; resuming from it would not be exact")
    model.load_state_dict(state, strict=False)
    return sorted(state)
