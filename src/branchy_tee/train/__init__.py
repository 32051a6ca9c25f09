"""Training multi-exit networks with knowledge distillation into the early exits."""
