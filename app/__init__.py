"""vllm-mxext: an OpenAI-compatible inference server with first-class LoRA."""

__version__ = "0.1.0"
