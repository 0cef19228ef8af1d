"""Every module here registers one fine-tuning method; importing the package registers them all."""
from . import full, llrd, lora, prompt_tuning  # noqa: F401
