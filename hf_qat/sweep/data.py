"""A sweep's tokens: fixed-length training and held-out blocks, and the batch of every step.

The batch of step ``k`` is a pure function of (seed, k): block ``order[(k * batch_size + i) % n]``
for ``i < batch_size``, with ``order`` a seeded permutation. So a tail that starts at step ``k``
reads exactly the batches the same run from scratch reads; there is no data-loader state to save.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import SweepConfig, SweepConfigError


@dataclass
class SweepData:
    """train: ``[n_train, L]`` token ids; eval: ``[n_eval, L]``; both int64 on the CPU; the tokenizer."""

    train: torch.Tensor
    eval: torch.Tensor
    tokenizer: Any = None

    def order(self, seed: int) -> torch.Tensor:
        return torch.randperm(self.train.shape[0], generator=torch.Generator().manual_seed(seed))

    def batch(self, order: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
        """The ``[batch_size, L]`` input ids of optimizer step ``step``."""
        index = (torch.arange(batch_size) + step * batch_size) % order.numel()
        return self.train[order[index]]

    @property
    def eval_tokens(self) -> int:
        """Predicted tokens per evaluation (each block predicts L - 1 next tokens)."""
        return self.eval.shape[0] * (self.eval.shape[1] - 1)


def data_file_name(config: SweepConfig, train_blocks: int) -> str:
    """The cache file of the tokenized data, named by a fingerprint of what determines it."""
    key = {"data": config.data, "vocab_size": config.vocab_size, "sequence_length": config.sequence_length,
           "eval_tokens": config.eval_tokens, "train_blocks": train_blocks}
    return f"data-{hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]}.pt"


def load_sweep_data(config: SweepConfig, train_blocks: int, cache_dir: str | None = None) -> SweepData:
    """Tokenized blocks for the sweep: at least ``train_blocks`` training blocks where the data has
    them (fewer are repeated), and ``ceil(eval_tokens / L)`` held-out blocks. Cached in
    ``cache_dir`` (keyed by the data settings) so a resumed sweep reads identical tokens."""
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, data_file_name(config, train_blocks))
        if os.path.exists(path) and os.path.isdir(path[:-3] + "-tokenizer"):
            from transformers import AutoTokenizer

            cached = torch.load(path)
            return SweepData(cached["train"], cached["eval"], AutoTokenizer.from_pretrained(path[:-3] + "-tokenizer"))
    length = config.sequence_length
    eval_blocks = -(-config.eval_tokens // length)
    if config.data == "demo":
        train, held_out, tokenizer = _demo_blocks(config, train_blocks, eval_blocks)
    else:
        train, held_out, tokenizer = _dataset_blocks(config, train_blocks, eval_blocks)
    if train.shape[0] == 0 or held_out.shape[0] == 0:
        raise SweepConfigError("data", config.data, "a source with at least one training and one held-out block of "
                               f"sequence_length={length} tokens")
    data = SweepData(train, held_out, tokenizer)
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tokenizer.save_pretrained(path[:-3] + "-tokenizer")
        torch.save({"train": train, "eval": held_out}, f"{path}.{os.getpid()}.tmp")
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    return data


def _demo_blocks(config: SweepConfig, train_blocks: int, eval_blocks: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    from ..demo.corpus import load_stdlib_corpus, make_blocks, train_tokenizer

    length = config.sequence_length
    # About 2.2 bytes of Python source per BPE token at small vocabularies (more read than needed).
    corpus = load_stdlib_corpus(max_train_bytes=int(train_blocks * length * 2.6) + 100_000,
                                max_eval_bytes=eval_blocks * length * 4)
    tokenizer = train_tokenizer(corpus.train_text, config.vocab_size)
    return (make_blocks(corpus.train_text, tokenizer, length, max_blocks=train_blocks, desc="tokenizing train"),
            make_blocks(corpus.eval_text, tokenizer, length, max_blocks=eval_blocks, desc="tokenizing eval"), tokenizer)


def _dataset_blocks(config: SweepConfig, train_blocks: int, eval_blocks: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """A datasets id or local text/JSONL files (as recipes/train.py reads them), tokenized with
    ``data.tokenizer`` or a byte-level BPE trained on the text; the last ``eval_blocks`` blocks are
    held out."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError("sweep data other than 'demo' needs the datasets package: pip install 'hf_qat[data]'") from None
    spec = config.data
    if spec.get("text_files"):
        raw = load_dataset("text", data_files=spec["text_files"], split="train")
    elif spec.get("jsonl_files"):
        raw = load_dataset("json", data_files=spec["jsonl_files"], split="train")
    else:
        raw = load_dataset(spec["dataset"], spec.get("config_name"), split=spec.get("split", "train"))
    column = spec.get("text_column", "text")
    if column not in raw.column_names:
        raise SweepConfigError("data.text_column", column, ", ".join(raw.column_names))
    texts = [t for t in raw[column] if t]
    if spec.get("tokenizer"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
        if len(tokenizer) > config.vocab_size:
            raise SweepConfigError("vocab_size", config.vocab_size, f"at least the tokenizer's {len(tokenizer)} tokens")
    else:
        from ..demo.corpus import train_tokenizer

        tokenizer = train_tokenizer(texts, config.vocab_size)
    from ..demo.corpus import make_blocks

    blocks = make_blocks(texts, tokenizer, config.sequence_length, max_blocks=train_blocks + eval_blocks)
    held = min(eval_blocks, max(1, blocks.shape[0] // 10))
    return blocks[:-held], blocks[-held:], tokenizer
