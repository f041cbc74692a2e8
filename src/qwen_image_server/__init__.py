"""qwen-image-server: an OpenAI-compatible image API for the Qwen-Image family on diffusers."""

__version__ = "0.1.0"
