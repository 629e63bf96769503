"""Tokenizers in GGUF, written so that llama.cpp cuts text into the same ids as transformers.

Two kinds of transformers (tokenizers-backed) tokenizer are written:

* byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM): llama.cpp's ``gpt2`` model with the merges, and the
  pre-tokenizer llama.cpp names for the split rule (``tokenizer.ggml.pre``; a wrong name tokenizes
  some texts differently).
* SentencePiece-style BPE (Gemma; Llama-2 with a "▁" prefix): BPE with byte fallback over text whose
  spaces are "▁". llama.cpp's ``llama`` (SentencePiece) model merges the adjacent pair whose joined
  text is the token of highest *score*, where transformers merges the pair of lowest *merge rank*; the
  two agree when every split of a token into two tokens is a merge (transformers' conversion of a
  SentencePiece model writes exactly those, ranked by the piece's score), with the score of a token
  minus the rank of its first merge. A tokenizer whose merges are not complete in that sense is
  refused. ``<0xXX>`` tokens are llama.cpp's byte tokens.

Both write which special tokens the tokenizer adds (``add_bos_token`` / ``add_eos_token``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import ExportFormatError

# The split regexes of the byte-level BPE families llama.cpp names (its llama-vocab.cpp pre-tokenizers).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("gpt-2 (ByteLevel)", "smollm (Digits + ByteLevel)", "llama-bpe (Llama-3 split)", "qwen2 (Qwen2 split)")
SPACE = "\u2581"  # "▁", SentencePiece's space


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer's ``pre_tokenizer`` spec."""
    if pre is None:
        raise ExportFormatError("GGUF export needs a byte-level BPE tokenizer with a pre-tokenizer")
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern == LLAMA3_SPLIT:
            return "llama-bpe"
        if pattern == QWEN2_SPLIT:
            return "qwen2"
    raise ExportFormatError(f"GGUF export knows the pre-tokenizers {', '.join(PRE_TOKENIZERS)}; this tokenizer's "
                            f"({' + '.join(map(str, kinds))}) is none of them, so llama.cpp could split text differently")


def sentencepiece_prefix(spec: dict) -> bool | None:
    """For a SentencePiece-style BPE tokenizer spec: whether it prepends "▁" to the text (llama.cpp's
    ``add_space_prefix``); None for any other tokenizer."""
    model, normalizer, pre = spec.get("model", {}), spec.get("normalizer") or {}, spec.get("pre_tokenizer")
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    kinds = [step.get("type") for step in steps]
    replace = steps[-1] if kinds and kinds[-1] == "Replace" else {}
    if replace.get("pattern", {}).get("String") != " " or replace.get("content") != SPACE:
        return None
    # transformers' Gemma pre-tokenizer splits on " ", which the normalizer has already replaced: a no-op
    no_op_split = pre is None or (pre.get("type") == "Split" and pre.get("pattern", {}).get("String") == " ")
    if not no_op_split:
        return None
    if kinds == ["Replace"]:
        return False
    if kinds == ["Prepend", "Replace"] and steps[0].get("prepend") == SPACE:
        return True
    return None


@dataclass
class GGUFVocab:
    """What GGUF stores of a tokenizer (built and checked by :func:`gguf_vocab` before anything is written).

    Attributes:
        model: llama.cpp's tokenizer model, "gpt2" or "llama".
        pre: llama.cpp's pre-tokenizer name ("default" for "llama").
        tokens / types: one per id of the model's vocabulary (gaps as ``[PAD<id>]``, UNUSED).
        merges: "gpt2" only, "left right" strings.
        scores / add_space_prefix: "llama" only.
        special_ids: {"bos"|"eos"|"pad"|"unk": id} of the tokens the tokenizer has.
        add_bos / add_eos: whether the tokenizer adds them to a text.
    """

    model: str
    pre: str
    tokens: list[str]
    types: list
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    add_space_prefix: bool = False
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """The tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece) model;
    raises ExportFormatError for one llama.cpp would tokenize differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportFormatError("GGUF export needs a fast (tokenizers-backed) BPE tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ExportFormatError(f"GGUF export writes BPE tokenizers; this one is {model.get('type')!r}")
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    vocab = {**model["vocab"], **{content: t["id"] for content, t in added.items()}}
    if max(vocab.values()) >= vocab_size:
        raise ExportFormatError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is "
                                f"{vocab_size}: they do not belong together")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    tokens = [None] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
    prefix = sentencepiece_prefix(spec)
    types = [_token_type(token, added, sentencepiece=prefix is not None) for token in tokens]
    tokens = [f"[PAD{i}]" if token is None else token for i, token in enumerate(tokens)]
    special_ids = {name: value for name in ("bos", "eos", "pad", "unk")
                   if (value := getattr(tokenizer, f"{name}_token_id", None)) is not None}
    added_ids = tokenizer("", add_special_tokens=True)["input_ids"]
    common = dict(tokens=tokens, types=types, special_ids=special_ids,
                  add_bos="bos" in special_ids and special_ids["bos"] in added_ids,
                  add_eos="eos" in special_ids and special_ids["eos"] in added_ids)
    if prefix is None:
        return GGUFVocab("gpt2", pre_tokenizer_name(spec.get("pre_tokenizer")), merges=[" ".join(m) for m in merges],
                         **common)
    return GGUFVocab("llama", "default", scores=sentencepiece_scores(tokens, types, merges), add_space_prefix=prefix,
                     **common)


def add_tokenizer(writer, vocab: GGUFVocab) -> None:
    """Write ``vocab``'s ``tokenizer.ggml.*`` keys."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id,
              "unk": writer.add_unk_token_id}
    for name, value in vocab.special_ids.items():
        adders[name](value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)


def _token_type(token: str | None, added: dict, sentencepiece: bool):
    import gguf

    if token is None:
        return gguf.TokenType.UNUSED
    if token in added:
        return gguf.TokenType.CONTROL if added[token].get("special") else gguf.TokenType.USER_DEFINED
    if sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def sentencepiece_scores(tokens: list[str], types: list, merges: list[tuple[str, str]]) -> list[float]:
    """Scores under which llama.cpp's SentencePiece merging equals transformers' BPE: minus the rank of
    a token's first merge (0 for tokens no merge makes). Raises if some token can be split into two
    tokens that are not a merge (llama.cpp would join them, transformers would not)."""
    import gguf

    normal = {token for token, kind in zip(tokens, types) if kind == gguf.TokenType.NORMAL}
    score: dict[str, float] = {}
    for rank, (left, right) in enumerate(merges):
        score.setdefault(left + right, -float(rank))
    pairs = set(merges)
    for token in normal:
        for k in range(1, len(token)):
            if token[:k] in normal and token[k:] in normal and (token[:k], token[k:]) not in pairs:
                raise ExportFormatError(
                    f"the tokenizer's token {token!r} splits into the tokens {token[:k]!r} + {token[k:]!r}, which "
                    "are not a merge: llama.cpp's SentencePiece tokenizer would join them where transformers does "
                    "not. GGUF export needs the merges of a converted SentencePiece model (every such split)"
                )
    return [score.get(token, 0.0) for token in tokens]
