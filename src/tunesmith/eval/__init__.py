"""Evaluation: held-out loss and perplexity, task metrics for the built-in task, and the run report."""
