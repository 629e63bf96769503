"""Jinja templates for the README.md (model card) of exported checkpoints."""
