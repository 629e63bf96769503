"""Training integration: the callback that switches a Trainer run to QAT (:mod:`.callback`), the Trainer
methods it wraps (:mod:`.trainer_hooks`), the scales' optimizer group, distillation, exact resume, and
what a run feeds the planner. See docs/architecture.md."""
