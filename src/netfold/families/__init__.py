"""Model-family adapters: channel groups for models torch.fx cannot trace (Hugging Face)."""
