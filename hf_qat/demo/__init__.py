"""The embedded end-to-end demo (``hf-qat demo``): a small Llama trained from scratch on text that
ships with Python, FP then compute-optimal QAT, compared with FP-only and PTQ, exported and reloaded."""
