"""Training-loop helpers: step helpers, learning-rate schedule, metrics, and checkpoints with exact resume."""
