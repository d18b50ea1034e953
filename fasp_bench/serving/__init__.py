"""Serving with vLLM: the plugin that registers the project architectures, and the measurement."""
