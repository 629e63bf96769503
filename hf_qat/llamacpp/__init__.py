"""What llama.cpp computes and reads, one table per fact: the GGML type its quantizer gives each tensor of
each file type, block sizes and fallbacks (:mod:`.file_types`), the architectures hf_qat writes and the
settings their graphs reproduce (:mod:`.architectures`), tensor names, expert stacks and the tied head
(:mod:`.tensors`), and tokenizers (:mod:`.vocab`). The GGUF writer that packs a QAT model into these is
the export format :mod:`hf_qat.export.gguf`; installing QAT reads this package and never the exporters."""
