"""``tunesmith serve``: an OpenAI-compatible HTTP server for a base model and many LoRA adapters, on the engine."""
