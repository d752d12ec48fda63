"""Hugging Face Hub access: the API client, verified resumable pulls, GGUF repo tags, range reads, safe writes."""
