"""The one training loop every model uses, on Hugging Face accelerate."""
