"""Training: shared flags, checkpoints and loop, and one module per task (subject, control)."""
