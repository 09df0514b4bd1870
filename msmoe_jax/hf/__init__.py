"""Hugging Face checkpoints (config.json + *.safetensors) to and from msmoe-jax."""
