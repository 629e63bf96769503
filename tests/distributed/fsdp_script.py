"""Run by tests/distributed/test_fsdp.py under torchrun (gloo, CPU), or alone: QAT under FSDP2.

accelerate enables FSDP only on GPUs, so on CPU this drives ``fully_shard`` directly with hf_qat's
public pieces, exactly as the Trainer integration does: QAT layers installed before wrapping, the
scales in their own param group, ``activate_qat`` at the switch (it all-gathers the weights and writes
each rank's shard of the scales), export gathering on every rank and writing on rank 0.

Writes ``rank{r}.pt`` (full state dict gathered on that rank, losses) and an hf-qat export into --out.
Global batch = 4 sequences per step, split across ranks.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from helpers import tiny_llama, tiny_moe, token_dataset  # noqa: E402

import hf_qat  # noqa: E402
from hf_qat.training.optim import add_scale_param_group  # noqa: E402
from hf_qat.model.distributed import full_tensor  # noqa: E402


def export_memory(out: str, world: int, rank: int) -> None:
    """``--export-memory``: a larger model, sharded and switched to QAT (PTQ scales), then exported; each
    rank records the growth of its peak resident memory during the export (``rank{r}_memory.json``)."""
    import json
    import resource

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(hidden=512, layers=8)
    hf_qat.prepare_model_for_qat(model, hf_qat.QATConfig(bits=4, group_size=32, start=0))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    hf_qat.activate_qat(model)  # gathers every weight once: the per-tensor peak is in the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hf_qat.export_checkpoint(model, os.path.join(out, "export"), format="hf-qat")
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    quantized = sum(m.weight.numel() for _, m in hf_qat.qat_modules(model))
    with open(os.path.join(out, f"rank{rank}_memory.json"), "w") as fh:
        json.dump({"growth_bytes": growth, "quantized_weights": quantized}, fh)


def finish(world: int) -> None:
    """Tear the process group down once every rank is here: destroying it while a peer's collective (or
    FSDP's asynchronous gather) is still in flight is the likely cause of a rare gloo abort
    (SIGABRT, "terminate called without an active exception") that CI saw once."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--start", type=int, default=4)
    parser.add_argument("--export-memory", action="store_true")
    parser.add_argument("--moe", action="store_true", help="a tiny Qwen3-MoE instead of the tiny Llama")
    parser.add_argument("--kquant", action="store_true", help="a 256-wide Llama on q4_k (a [R, G, 2] scale-pair "
                        "parameter); its GGUF blocks' inputs are collected instead of an hf-qat export")
    parser.add_argument("--activation-bits", type=int, default=None, help="8: int8-rounded Linear inputs (a8w4)")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo")
    if args.export_memory:
        export_memory(args.out, world, rank)
        finish(world)
        return

    if args.moe:  # a Qwen3-MoE: FSDP2 shards the fused experts' dim 0 (the experts)
        model = tiny_moe("qwen3_moe", intermediate_size=32, moe_intermediate_size=32)
        cfg = hf_qat.QATConfig(bits=4, group_size=16, start=args.start)
    elif args.kquant:
        model = tiny_llama(tie=True, hidden=256)
        cfg = hf_qat.QATConfig(bits=4, method="q4_k", start=args.start)
    else:
        model = tiny_llama(tie=True)
        cfg = hf_qat.QATConfig(bits=4, group_size=16, start=args.start, embedding_bits=4,
                               activation_bits=args.activation_bits)
    hf_qat.prepare_model_for_qat(model, cfg)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert hf_qat.model.distributed.is_dtensor(model.model.layers[0].self_attn.q_proj.weight_quantizer.log_scale_ratio)
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    rest = [p for n, p in model.named_parameters() if "norm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=3e-3)
    assert add_scale_param_group(optimizer, model, lambda base_lr: base_lr)  # the scales at the base LR

    data = token_dataset(n=4 * args.steps)
    per_rank = 4 // world
    losses = []
    for step in range(args.steps):
        if step == args.start:
            hf_qat.activate_qat(model)
        rows = data[step * 4 + rank * per_rank: step * 4 + (rank + 1) * per_rank]
        batch = torch.stack([r["input_ids"] for r in rows])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logged = loss.detach().clone()
        if world > 1:
            dist.all_reduce(logged)
            logged /= world
        losses.append(float(logged))

    state = {k: full_tensor(v).detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state": state, "losses": losses, "world": world}, os.path.join(args.out, f"rank{rank}.pt"))
    if args.kquant:  # every rank gathers, rank 0 keeps: the codes and block scales GGUF would pack
        from hf_qat.export import collect_layers

        layers, _ = collect_layers(model, keep=rank == 0)
        blocks = {layer.name: (layer.codes, layer.ggml_scales.step, layer.ggml_scales.min) for layer in layers}
        torch.save(blocks, os.path.join(args.out, f"blocks{rank}.pt"))
    else:
        hf_qat.export_checkpoint(model, os.path.join(args.out, "export"), format="hf-qat")
    finish(world)


if __name__ == "__main__":
    main()
