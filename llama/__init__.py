"""Llama inference for the family (Llama 2, Code Llama, Llama Guard, Llama 3.x): model, tokenizers, generator."""

import os as _os
import sys as _sys

from .programs import interrupt as _interrupt

if _interrupt.is_program_start():  # Ctrl-C during the imports below: one line and status 130, no traceback
    _interrupt.install()

# Idle OpenMP threads spin between parallel regions by default. On a machine whose cores are shared with other
# work, the spinning threads take the cores from the very thread they wait for, and every matrix product pays
# a scheduler time slice: measured on 2 cores with one other busy process, batch-1 decoding fell from 7 to
# 0.7 tokens/s (ours and transformers alike), and to 3.8 with passive waiting. OpenMP reads this once, when
# torch loads: it takes effect only if llama is imported first (docs/performance.md); set it to ACTIVE to
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

# Modules that moved into the wings (model/, cpu/, checkpoints/, families/, programs/) keep their old import
# paths: `import llama.checkpoint` gives llama.checkpoints.checkpoint itself (one module object, so patching
# either name patches both). The old `python -m llama.convert` style spellings are gone (docs/architecture.md, "Changes in 0.2").
_MOVED = {
    "llama.layers": "llama.model.layers",
    "llama.distributed": "llama.model.distributed",
    "llama.decode_step": "llama.model.decode_step",
    "llama.fused_decode": "llama.model.fused_decode",
    "llama.qkernels": "llama.cpu.qkernels",
    "llama.checkpoint": "llama.checkpoints.checkpoint",
    "llama.hf": "llama.checkpoints.hf",
    "llama.source": "llama.checkpoints.source",
    "llama.loading": "llama.checkpoints.loading",
    "llama.lora": "llama.checkpoints.lora",
    "llama.convert": "llama.checkpoints.convert",
    "llama.quantize": "llama.checkpoints.quantize",
    "llama.reshard": "llama.checkpoints.reshard",
    "llama.chat_format": "llama.families.chat_format",
    "llama.cli": "llama.programs.cli",
    "llama.chat": "llama.programs.terminal_chat",
    "llama.engine.lora_slots": "llama.checkpoints.lora_slots",
}


class _MovedModules:
    """An import hook that answers an old module name with the module at its new place."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _MOVED:
            return None
        import importlib
        import importlib.util

        module = importlib.import_module(_MOVED[name])
        spec = importlib.util.spec_from_loader(name, _MovedModules)
        spec._moved, spec._real = module, module.__spec__  # type: ignore[attr-defined]
        return spec

    @staticmethod
    def create_module(spec):
        return spec._moved

    @staticmethod
    def exec_module(module):
        module.__spec__ = module.__spec__._real  # importlib set the old name's spec on it: put the real one back


_sys.meta_path.insert(0, _MovedModules)

from .families.chat_format import ChatFormat, Dialog, Message
from .families import Moderation
from .builder import BuildConfig
from .generation import ChatPrediction, CompletionPrediction, InfillingPrediction, Llama
from .model.transformer import ModelArgs, Transformer
from .tokenizer import Tokenizer

__all__ = ["Llama", "BuildConfig", "Dialog", "Message", "Tokenizer", "ModelArgs", "Transformer", "ChatFormat",
           "CompletionPrediction", "ChatPrediction", "InfillingPrediction", "Moderation"]
