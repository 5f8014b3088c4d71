"""Which LoRA adapters a model serves and which of them sit in its banks' slots (llama/model/lora_bank.py).

Adapters are registered by name with their PEFT folder, read and checked against the model at registration (a
wrong shape, rank or target is refused then, naming the file and module). At most `max_loras` are in the banks
at once; a request takes a slot for its adapter when admitted (loading it from its folder into the least recently
used free slot if it is not there) and gives it back when it ends. When every slot is busy with other adapters,
the request waits in the queue (`available` is False) until one frees.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from .lora import MAX_RANK, factors_for, read_adapter
from ..model import lora_bank

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


class LoraSlots:
    """The adapters one model serves (shared by every engine over that model, like its KV pool)."""

    def __init__(self, model, rank: int, world: int, max_loras: int, max_rank: int) -> None:
        self.model, self.rank, self.world = model, rank, world
        self.max_loras, self.max_rank = max_loras, max_rank
        self.bank = lora_bank.attach(model, max_loras, max_rank)
        self.paths: Dict[str, str] = {}
        self.slot_of: Dict[str, int] = {}
        self.busy = [0] * max_loras  # requests holding each slot
        self.recent: "OrderedDict[int, None]" = OrderedDict((s, None) for s in range(max_loras))  # LRU first
        self.loads = 0

    @staticmethod
    def check_name(name: str) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"LoRA adapter name {name!r} must be 1-128 letters, digits or ._:/- (starting with a "
                             "letter or digit)")

    def register(self, name: str, path: str) -> None:
        """Read and check the adapter at `path` (ValueError / FileNotFoundError naming file and module) and serve
        it as `name`; it is loaded into a slot when a request first needs it."""
        self.check_name(name)
        adapter = read_adapter(path, self.model.params)
        if adapter.r > self.max_rank:
            raise ValueError(f"LoRA adapter {str(path)!r} has rank {adapter.r}, more than this server's banks hold "
                             f"({self.max_rank}; at most {MAX_RANK})")
        if name in self.slot_of:  # replaced: its old weights must not serve the new name
            slot = self.slot_of.pop(name)
            self.bank.names[slot] = None
        self.paths[name] = str(Path(path))

    def unregister(self, name: str) -> None:
        """Stop serving `name` (ValueError when unknown or while a request uses it)."""
        if name not in self.paths:
            raise ValueError(f"LoRA adapter {name!r} is not loaded")
        slot = self.slot_of.get(name)
        if slot is not None and self.busy[slot]:
            raise ValueError(f"LoRA adapter {name!r} is in use by {self.busy[slot]} running request(s)")
        del self.paths[name]
        if slot is not None:
            del self.slot_of[name]
            self.bank.names[slot] = None

    @property
    def names(self) -> List[str]:
        return list(self.paths)

    def key(self, name: str) -> bytes:
        """What the prefix cache mixes into a prompt's keys: the adapter's name and folder."""
        return f"lora\0{name}\0{self.paths.get(name, '')}\0".encode()

    def available(self, name: str) -> bool:
        """Whether `acquire(name)` can run now: the adapter is in a slot, or some slot is free of requests (an
        adapter no longer served: True, so that adding the request fails with an error instead of waiting)."""
        return name not in self.paths or name in self.slot_of or any(b == 0 for b in self.busy)

    def acquire(self, name: str) -> Tuple[int, Optional[str]]:
        """A slot holding `name` for one more request, and the folder to load into it first (None: already
        there). The slot chosen for a load is the least recently used one that no request holds."""
        if name not in self.paths:
            raise ValueError(f"LoRA adapter {name!r} is not loaded")
        slot = self.slot_of.get(name)
        load = None
        if slot is None:
            slot = next(s for s in self.recent if self.busy[s] == 0)
            old = self.bank.names[slot]
            if old is not None:
                self.slot_of.pop(old, None)
            self.slot_of[name] = slot
            self.bank.names[slot] = name  # claimed now; the weights arrive with the step that loads them
            load = self.paths[name]
        self.busy[slot] += 1
        self.recent.move_to_end(slot)
        return slot, load

    def release(self, slot: int) -> None:
        self.busy[slot] -= 1

    def load(self, slot: int, name: str, path: str) -> None:
        """Read the adapter at `path` into `slot` of every bank (this rank's slices)."""
        adapter = read_adapter(path, self.model.params)
        self.bank.load(slot, name, factors_for(adapter, self.rank, self.world, self.model.params))
        self.loads += 1


def check(adapters: Mapping[str, str], args, max_loras: Optional[int],
          max_rank: Optional[int]) -> Tuple[int, int]:
    """Check `Llama.build(lora={name: folder})` before any weight loads: names, every adapter against the model
    (naming file and module), the ranks; returns (slots, bank rank)."""
    if not isinstance(adapters, Mapping) or not (adapters or max_rank):
        raise ValueError(f"lora must be an adapter folder or a non-empty {{name: folder}} mapping (empty only with "
                         f"max_lora_rank, for adapters loaded later), got {adapters!r}")
    ranks = [1]
    for name, path in adapters.items():
        LoraSlots.check_name(name)
        adapter = read_adapter(path, args)
        if adapter.r > MAX_RANK:
            raise ValueError(f"LoRA adapter {str(path)!r} has rank {adapter.r}; at most {MAX_RANK} is supported")
        ranks.append(adapter.r)
    slots = max(len(adapters), 1) if max_loras is None else max_loras
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ValueError(f"max_loras must be a positive integer, got {max_loras!r}")
    rank = max(ranks) if max_rank is None else max_rank
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK or rank < max(ranks):
        raise ValueError(f"max_lora_rank must be an integer from {max(ranks)} (the largest adapter's rank) to "
                         f"{MAX_RANK}, got {max_rank!r}")
    return slots, rank


def install(model, adapters: Mapping[str, str], slots: int, rank: int, mp_rank: int, world: int) -> LoraSlots:
    """Give `model` its banks and register the adapters (loaded into slots on first use); `model.lora_slots`."""
    lora = LoraSlots(model, mp_rank, world, slots, rank)
    for name, path in adapters.items():
        lora.register(name, path)
    model.lora_slots = lora
    from ..model import distributed
    distributed.print0(f"LoRA adapters beside the base: {', '.join(adapters) or 'none yet'} ({slots} slot"
                       f"{'s' * (slots > 1)} of rank {rank}, loaded on first use; decode steps with adapter rows "
                       "run the fused CPU step where it serves, never CUDA graphs)")
    return lora
