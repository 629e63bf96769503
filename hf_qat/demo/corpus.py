"""Offline training text for the demo: the Python standard library's own source code.

Every machine that runs hf_qat has it, so the demo needs no download. Files are read in sorted
order; every ``eval_every``-th file goes to the held-out set. A byte-level BPE tokenizer is trained on
the training text (``tokenizers``, a few seconds), and both sets are cut into fixed-length blocks.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

# Folders that are mostly data, generated tables or tests; skipped so the text is ordinary code.
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "encodings", "ensurepip",
             "pydoc_data", "turtledemo", "unittest", "tkinter", "config-3", "lib-dynload"}


@dataclass
class Corpus:
    train_text: list[str]
    eval_text: list[str]

    @property
    def train_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.train_text)


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def load_stdlib_corpus(max_train_bytes: int, max_eval_bytes: int, eval_every: int = 10, root: str | None = None) -> Corpus:
    """Source files of the standard library: about ``max_train_bytes`` of training text and
    ``max_eval_bytes`` of held-out text, deterministic for a given Python installation."""
    root = root or stdlib_root()
    paths = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(("config-", ".")))
        paths.extend(os.path.join(directory, f) for f in sorted(files) if f.endswith(".py"))
    train, held_out, n_train, n_eval = [], [], 0, 0
    for i, path in enumerate(paths):
        if n_train >= max_train_bytes and n_eval >= max_eval_bytes:
            break
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if i % eval_every == eval_every - 1:
            if n_eval < max_eval_bytes:
                held_out.append(text)
                n_eval += size
        elif n_train < max_train_bytes:
            train.append(text)
            n_train += size
    if not train or not held_out:
        raise RuntimeError(f"found no Python source under {root} to train the demo on")
    return Corpus(train, held_out)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style, so llama.cpp can use it) trained on ``texts``, as a
    transformers PreTrainedTokenizerFast with <|endoftext|> as BOS/EOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError(f"a byte-level BPE vocabulary holds the 256 bytes and <|endoftext|>: vocab_size must be >= 257, "
                         f"got {vocab_size}")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=1 << 20)


def make_blocks(texts: list[str], tokenizer, block_size: int, max_blocks: int | None = None,
                desc: str = "tokenizing") -> torch.Tensor:
    """Token ids of all ``texts`` (each followed by EOS), cut into ``[n_blocks, block_size]``."""
    ids: list[int] = []
    batch = 32
    for start in tqdm(range(0, len(texts), batch), desc=desc, leave=False):
        for encoded in tokenizer(texts[start:start + batch])["input_ids"]:
            ids.extend(encoded)
            ids.append(tokenizer.eos_token_id)
        if max_blocks is not None and len(ids) >= max_blocks * block_size:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


class BlockDataset(torch.utils.data.Dataset):
    """Blocks as causal-LM examples: input_ids and labels are the same block."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}
