"""Run by tests/distributed/test_*.py under torchrun (or alone): a short Trainer run with QAT.

Writes ``rank{r}.pt`` into --out with the final state dict, the scales and the logged losses.
Global batch = 4 sequences per optimizer step, whatever the number of processes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from helpers import make_trainer  # noqa: E402

from hf_qat import QATCallback, QATConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--start", type=int, default=6)
    parser.add_argument("--embedding-bits", type=int, default=None)
    parser.add_argument("--activation-bits", type=int, default=None)
    parser.add_argument("--distill", action="store_true", help="distil from the FP model at the switch")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    cfg = QATConfig(bits=4, group_size=16, start=args.start, embedding_bits=args.embedding_bits,
                    activation_bits=args.activation_bits, manage_schedule=False,
                    distill={"teacher": "switch", "weight": 0.5} if args.distill else None)
    trainer = make_trainer(
        args.out, [QATCallback(cfg)], max_steps=args.steps, per_device_train_batch_size=4 // world,
        logging_steps=1, learning_rate=3e-3,
    )
    trainer.train()
    model = trainer.model
    torch.save(
        {
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "distill": [h["qat/distill_loss"] for h in trainer.state.log_history if "qat/distill_loss" in h],
            "ce": [h["qat/ce_loss"] for h in trainer.state.log_history if "qat/ce_loss" in h],
            "world": world,
        },
        os.path.join(args.out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # gloo can abort a rank at exit with the group alive
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
