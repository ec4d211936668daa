"""LoRA adapter format conversion: Hugging Face PEFT, NeMo (.nemo) and TensorRT-LLM (.npy pair).

`convert_lora(params, ctx)` (service.py) is the job entry point; readers and writers per format
live beside it and meet in the format-neutral `Adapter` (adapter.py).
"""

from app.adapters.convert.detect import FORMATS, detect_format, normalise_format
from app.adapters.convert.service import convert_lora

__all__ = ["FORMATS", "convert_lora", "detect_format", "normalise_format"]
