"""The QAT state of a model as tensors: every unit's scales and switch state, saved beside a PEFT adapter.

PEFT checkpoints hold only the adapter's keys, so a LoRA + QAT run's learned scales and switch state
would be lost on resume and missing at export. QATCallback writes them into every checkpoint of a
PEFT model (:data:`STATE_FILE`) and loads them back when the Trainer resumes from one;
``export_checkpoint`` reads them with the base model and the adapter.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import QATModelError
from ..model.distributed import full_tensor, is_dtensor
from ..model.unit import UNIT_KEY

STATE_FILE = "hf_qat_state.safetensors"


def unit_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every QAT unit tensor of ``model`` by state-dict key, whole and on the CPU (all-gathered
    under FSDP2: call on every rank)."""
    return {key: full_tensor(value).detach().cpu().clone()
            for key, value in model.state_dict().items() if UNIT_KEY in key}


def save_unit_state(model: nn.Module, directory: str, write: bool = True) -> None:
    """Write :func:`unit_state` into ``directory/STATE_FILE`` (gathered on every rank; ``write`` on one)."""
    from safetensors.torch import save_file

    state = unit_state(model)
    if write:
        os.makedirs(directory, exist_ok=True)
        save_file(state, os.path.join(directory, STATE_FILE))


def load_unit_state(model: nn.Module, directory: str) -> bool:
    """Load ``directory/STATE_FILE`` into ``model`` if the folder has one (returns whether it did).
    Every unit key of the model must be in the file and the file must hold no other key."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        return False
    from safetensors.torch import load_file
    from torch.distributed.tensor import distribute_tensor

    saved = load_file(path)
    current = {k: v for k, v in model.state_dict().items() if UNIT_KEY in k}
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or unexpected:
        raise QATModelError(f"{path} does not match the model's QAT layers: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]} (was it saved with another QATConfig or adapter?)")
    state = {k: distribute_tensor(v.to(current[k].dtype), current[k].device_mesh, current[k].placements)
             if is_dtensor(current[k]) else v for k, v in saved.items()}
    model.load_state_dict(state, strict=False)
    return True
