"""Model surgery for third-party models (Hugging Face transformers)."""
