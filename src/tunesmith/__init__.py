"""tunesmith: fine-tune open causal language models, correctly."""

__version__ = "0.1.0"
