"""Llama 2 inference: model-parallel Transformer, tokenizer, chat format and generator."""

__version__ = "0.2.0"

from .chat_format import ChatFormat, Dialog, Message
from .generation import ChatPrediction, CompletionPrediction, Llama
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

__all__ = ["Llama", "Dialog", "Message", "Tokenizer", "ModelArgs", "Transformer", "ChatFormat",
           "CompletionPrediction", "ChatPrediction"]
