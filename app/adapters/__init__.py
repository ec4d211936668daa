"""Adapters served on top of the base model: reading PEFT LoRA folders (`peft.py`), the LoRA
config file and the serving setup (`lora_config.py`), and where adapters may be loaded from
(`security.py`)."""
