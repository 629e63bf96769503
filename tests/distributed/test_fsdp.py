"""2-process FSDP2 (fully_shard, gloo, CPU): identical ranks after the switch, the same losses as one
process with the same global batch, and an export identical to a single-process export of the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import hf_qat
from helpers import FSDP_SCRIPT, run_distributed, tiny_llama

pytestmark = pytest.mark.slow


def _sharded_and_single(tmp_path, *args: str) -> tuple[dict, dict]:
    """Run the script on 2 ranks and on 1 process; assert the ranks end with the same full state and the losses
    are within 1e-4 of one process's with the same global batch; return (rank 0's, the single process's) results."""
    run_distributed(tmp_path / "fsdp", 2, *args, script=FSDP_SCRIPT)
    run_distributed(tmp_path / "single", 1, *args, script=FSDP_SCRIPT)
    r0, r1 = torch.load(tmp_path / "fsdp" / "rank0.pt"), torch.load(tmp_path / "fsdp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert r0["world"] == 2 and single["world"] == 1
    assert sorted(r0["state"]) == sorted(r1["state"])
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    assert len(r0["losses"]) == len(single["losses"]) == 10
    for a, b in zip(r0["losses"], single["losses"]):
        assert abs(a - b) <= 1e-4
    return r0, single


def test_fsdp2_ranks_losses_and_export(tmp_path):
    # Every rank gathers the same full weights and scales after the switch; the losses are one process's.
    r0, _ = _sharded_and_single(tmp_path)
    scales = [n for n in r0["state"] if n.endswith("log_scale_ratio")]
    assert scales and all(bool(r0["state"][n.replace("log_scale_ratio", "active")]) for n in scales)

    # The export written from the sharded model equals a single-process export of the same weights.
    model = tiny_llama(tie=True)
    hf_qat.prepare_model_for_qat(model, hf_qat.QATConfig(bits=4, group_size=16, start=4, embedding_bits=4))
    model.load_state_dict(r0["state"])
    hf_qat.export_checkpoint(model, tmp_path / "reference", format="hf-qat")
    sharded = load_file(tmp_path / "fsdp" / "export" / "model.safetensors")
    reference = load_file(tmp_path / "reference" / "model.safetensors")
    assert sorted(sharded) == sorted(reference)
    for key in reference:
        assert torch.equal(sharded[key], reference[key]), key
    config = json.loads((tmp_path / "fsdp" / "export" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((tmp_path / "reference" / "config.json").read_text())["quantization_config"]


def test_fsdp2_with_int8_activations_matches_one_process(tmp_path):
    """a8w4 (int8-rounded Linear inputs) under FSDP2: the ranks end with the same state, the losses follow one
    process's with the same global batch, and the sharded export records the int8 inputs."""
    _sharded_and_single(tmp_path, "--activation-bits", "8")  # losses seen equal to 6 decimals
    config = json.loads((tmp_path / "fsdp" / "export" / "config.json").read_text())
    layers = config["quantization_config"]["modules"]
    assert layers["model.layers.0.mlp.down_proj"]["activation_bits"] == 8  # the export keeps the int8 inputs


def test_fsdp2_export_keeps_the_model_on_rank_0_only(tmp_path):
    """Rank 0 gathers and packs every layer; rank 1 takes part in the gathers one tensor at a time and
    keeps nothing, so its peak memory does not grow with the model (holding every layer's codes alone
    would grow it by one byte per weight)."""
    run_distributed(tmp_path, 2, "--export-memory", script=FSDP_SCRIPT)
    r0 = json.loads((tmp_path / "rank0_memory.json").read_text())
    r1 = json.loads((tmp_path / "rank1_memory.json").read_text())
    codes_bytes = r0["quantized_weights"]  # int8 codes of every quantized weight
    assert codes_bytes > 15e6
    assert r1["growth_bytes"] < 0.25 * codes_bytes, r1
    assert r0["growth_bytes"] > 0.5 * codes_bytes, r0  # the writer does hold the packed model
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_fsdp2_shards_the_fused_experts_and_matches_one_process(tmp_path):
    """A Qwen3-MoE under FSDP2 (its [experts, ...] stacks and their scales sharded on dim 0): the ranks
    gather the same state, the losses equal one process's, and the sharded export equals a single-process
    export of the same weights."""
    r0, _ = _sharded_and_single(tmp_path, "--moe")
    assert any(name.endswith("experts.gate_up_proj_quantizer.log_scale_ratio") for name in r0["state"])
    from helpers import tiny_moe

    model = tiny_moe("qwen3_moe", intermediate_size=32, moe_intermediate_size=32)
    hf_qat.prepare_model_for_qat(model, hf_qat.QATConfig(bits=4, group_size=16, start=4))
    model.load_state_dict(r0["state"])
    hf_qat.export_checkpoint(model, tmp_path / "reference", format="hf-qat")
    sharded = load_file(tmp_path / "fsdp" / "export" / "model.safetensors")
    reference = load_file(tmp_path / "reference" / "model.safetensors")
    assert sorted(sharded) == sorted(reference) and any("experts" in key for key in reference)
    for key in reference:
        assert torch.equal(sharded[key], reference[key]), key


def test_fsdp2_trains_and_exports_a_k_quant_like_one_process(tmp_path):
    """q4_k (a scale and a min per block: a [R, G, 2] Parameter) under FSDP2: the ranks gather the same state,
    the losses equal one process's, and the GGUF blocks' codes and scales collected from the sharded model
    (every rank gathering, rank 0 keeping) equal those of one process given the sharded run's weights."""
    run_distributed(tmp_path / "fsdp", 2, "--kquant", script=FSDP_SCRIPT)
    run_distributed(tmp_path / "single", 1, "--kquant", script=FSDP_SCRIPT)
    r0, r1 = torch.load(tmp_path / "fsdp" / "rank0.pt"), torch.load(tmp_path / "fsdp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    pairs = [name for name in r0["state"] if name.endswith("log_scale_ratio")]
    assert pairs and all(r0["state"][name].shape[-1] == 2 for name in pairs)
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    # 256 wide: sharded reductions differ more than at 32, and in QAT a code that one run rounds the other way
    # shifts a loss for a step (seen: 1.2e-4 once in the 6 QAT steps, with transformers 5.25 and torch 2.13)
    gaps = [abs(a - b) / abs(b) for a, b in zip(r0["losses"], single["losses"], strict=True)]
    fp, qat = gaps[:4], gaps[4:]  # the script's QAT starts at step 4 of 10
    assert len(qat) == 6 and max(fp) <= 1e-4, gaps
    assert max(qat) <= 3e-4 and sum(g > 5e-5 for g in qat) <= 1, gaps
    sharded, reference = torch.load(tmp_path / "fsdp" / "blocks0.pt"), torch.load(tmp_path / "single" / "blocks0.pt")
    assert torch.load(tmp_path / "fsdp" / "blocks1.pt") == {}  # rank 1 took part in the gathers and kept nothing
    assert sorted(sharded) == sorted(reference) and len(reference) == 14
    model = tiny_llama(tie=True, hidden=256)
    hf_qat.prepare_model_for_qat(model, hf_qat.QATConfig(bits=4, method="q4_k", start=4))
    model.load_state_dict(r0["state"])
    from hf_qat.export import collect_layers

    for layer in collect_layers(model)[0]:
        codes, step, minimum = sharded[layer.name]
        assert torch.equal(codes, layer.codes) and torch.equal(step, layer.ggml_scales.step), layer.name
        assert torch.equal(minimum, layer.ggml_scales.min), layer.name
