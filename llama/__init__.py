"""Llama inference for the family (Llama 2, Code Llama, Llama Guard, Llama 3.x): model, tokenizers, generator."""

import os as _os
import sys as _sys

# Idle OpenMP threads spin between parallel regions by default. On a machine whose cores are shared with other
# work, the spinning threads take the cores from the very thread they wait for, and every matrix product pays
# a scheduler time slice: measured on 2 cores with one other busy process, batch-1 decoding fell from 7 to
# 0.7 tokens/s (ours and transformers alike), and to 3.8 with passive waiting. OpenMP reads this once, when
# torch loads: it takes effect only if llama is imported first (README, "Performance"); set it to ACTIVE to
# spin on a dedicated machine.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # torch.compile's kernel cache is not keyed on ATEN_CPU_CAPABILITY (used to emulate an older CPU): kernels
    # cached under one setting gave wrong results, or corrupted memory, under the other. Keep them apart.
    if _os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in _os.environ:
        import getpass as _getpass
        import tempfile as _tempfile

        _os.environ["TORCHINDUCTOR_CACHE_DIR"] = _os.path.join(
            _tempfile.gettempdir(), f"torchinductor_{_getpass.getuser()}_{_os.environ['ATEN_CPU_CAPABILITY'].lower()}")

__version__ = "0.2.0"

from .chat_format import ChatFormat, Dialog, Message
from .families import Moderation
from .generation import ChatPrediction, CompletionPrediction, InfillingPrediction, Llama
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

__all__ = ["Llama", "Dialog", "Message", "Tokenizer", "ModelArgs", "Transformer", "ChatFormat",
           "CompletionPrediction", "ChatPrediction", "InfillingPrediction", "Moderation"]
