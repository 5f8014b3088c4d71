"""The checkpoints wing: how weights are stored and split. Meta's layout (checkpoint.py) and Hugging Face's (hf.py)
behind one opened Checkpoint (source.py); loading a model from it (loading.py); LoRA adapters (lora.py); and the
programs' checkpoint rewrites (convert.py, quantize.py, reshard.py)."""

from . import checkpoint, hf  # noqa: F401,E402  (each layout's reader registers itself with source.py)
