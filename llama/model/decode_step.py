"""The decode step, the hot loop of generation: eager, or compiled with shapes that never change.

A compiled step attends over a fixed window (the smallest of 256, 512, 1024... that holds every row's position,
capped at max_seq_len) with the mask carrying the positions, so during a generation its shapes change only when
the window grows, a handful of times at most. On CUDA it is compiled with ``mode="reduce-overhead"``: each shape
is captured once as a CUDA graph and replayed with one launch per step, which removes the per-kernel launch
cost that bounds batch-1 decoding on a GPU. Eager steps attend over exactly the positions in use, the least
work where launches are cheap (CPUs). An eager CPU step of a model whose linear layers all run on the project's
own kernels runs its layers in one C call (llama/model/fused_decode.py).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional, Sequence

import torch

from .. import cpu
from . import distributed
from ..cpu import qkernels
from .fused_decode import MAX_ROWS, FusedDecode
from .transformer import Transformer

_FIRST_WINDOW = 256


def _window_for(length: int, max_seq_len: int, fixed: bool, full: bool = False) -> int:
    """Positions a step attends over when the furthest row has `length` tokens: exactly that when eager; in a
    compiled step, the next power-of-two bucket from FIRST_WINDOW, capped at max_seq_len; the whole context
    when `full` (deterministic: a row's arithmetic must not depend on how far its neighbours are)."""
    if full:
        return max_seq_len
    if not fixed:
        return length
    window = _FIRST_WINDOW
    while window < length:
        window *= 2
    return min(window, max_seq_len)


class DecodeStep:
    """Calls `model.decode` for a batch whose positions are known on the host (no device sync here)."""

    def __init__(self, model: Transformer, compiled: bool, fixed_window: Optional[bool] = None,
                 full_window: bool = False, fused: Optional[bool] = None) -> None:
        """fixed_window (default: as compiled) attends over the bucketed windows even when eager, which
        gives the compiled step's arithmetic without compiling (the tests compare it with exact windows).
        full_window: deterministic mode: an eager step attends each row alone over its own positions, a compiled
        one over the whole context, so that a row's arithmetic never depends on its neighbours.
        fused: run an eager CPU step's layers in one C call (llama.fused_decode) where the model allows it
        (None, the default) or never (False; benchmarks compare the two). A fused row attends over its own
        positions only, whatever the window."""
        self.model = model
        self.full_window = full_window
        self.compiled = compiled
        self.fixed_window = compiled if fixed_window is None else fixed_window
        self.device = model.rope.device
        self._warm = set()  # (batch, window) shapes already run
        mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs where they exist
        self._compiled_fn: Optional[Callable] = torch.compile(model.decode, mode=mode) if compiled else None
        # On a CPU whose linear layers all run the project's own kernels, the step's other operators run on one
        # thread and the kernels on all (llama.qkernels.decoding_threads).
        self._threads = qkernels.decoding_threads if self.device.type == "cpu" and \
            cpu.decodes_on_own_kernels(model) else contextlib.nullcontext
        self.fused = FusedDecode.for_model(model) if fused is not False and not compiled and \
            self.device.type == "cpu" else None

    def __call__(self, tokens: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Next-token logits (B, V) for tokens (B,) at host-known positions (one per cache row 0..B-1)."""
        with self._threads():
            return self._step(tokens, positions)

    def _step(self, tokens: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        # A step with LoRA adapter rows runs the fused C step, which adds their terms (llama/model/fused_lora.py),
        # or else the layers' path (compiled graphs have no adapter term); base-only steps keep compiled graphs,
        # except in deterministic mode, where a base row's arithmetic must not depend on whether a neighbour has
        # an adapter (the fused step's rows never depend on each other).
        lora = getattr(self.model, "lora_set", None)
        adapters = lora is not None and (lora.active or self.full_window)
        if self.fused is not None and len(positions) < MAX_ROWS and (not adapters or self.fused.takes_adapters):
            return self.fused(tokens, positions)
        window = _window_for(max(positions) + 1, self.model.params.max_seq_len, self.fixed_window, self.full_window)
        pos = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        if not self.compiled or adapters:
            # deterministic: each row attends alone over its own positions (not the whole context, padded)
            alone = [max(p, 0) + 1 for p in positions] if self.full_window else None
            return self.model.decode(tokens, pos, max(alone) if alone else window, alone)
        shape = (len(positions), window)
        if shape in self._warm:
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            return self._compiled_fn(tokens, pos, window)
        return self._first(shape, tokens, pos, window)

    def _first(self, shape, tokens: torch.Tensor, pos: torch.Tensor, window: int) -> torch.Tensor:
        """A shape's first call compiles (or captures) it: say so, time it, and fall back to eager on failure."""
        if not self._warm:
            distributed.print0("Compiling the decode step (once per process and shape; later builds reuse it)...")
        start = time.perf_counter()
        try:
            out = self._compiled_fn(tokens, pos, window)
        except Exception as err:  # a backend that cannot compile this model must not stop the generation
            distributed.print0(f"warning: compiling the decode step failed ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); decoding eagerly instead")
            self.compiled = self.fixed_window = False
            return self.model.decode(tokens, pos, int(pos.max()) + 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._warm.add(shape)
        distributed.print0(f"  decode step for batch {shape[0]}, window {shape[1]} ready in "
                           f"{time.perf_counter() - start:.1f} s")
        return out


def default_compile(device: torch.device, compile: Optional[bool]) -> bool:
    """compile=None: compiled (CUDA graphs) on CUDA, where launch cost dominates decoding; eager on CPUs."""
    if compile is None:
        return device.type == "cuda"
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or None (automatic), got {compile!r}")
    return compile
