"""Many LoRA adapters on one unmerged base: per adapted linear layer a bank of stacked A and B factors, and the
per-token choice of adapter that every layer of one model call reads.

A layer computes its base product on its own kernels (plain, packed, quantized, fused) and then adds, for each
token with an adapter, x·A·B (the scale folded into B). Tokens are grouped by adapter, so each adapter's factors
are read once per call however many rows use it (punica's BGMV does the same gather on a GPU); tokens with no
adapter are untouched. Deterministic mode computes every row's term alone (`gathered`), so that its arithmetic
never depends on which adapters its neighbours use.

A bank has `slots` entries of rank `rank` (adapters of lower rank are zero-padded, which adds exact zeros). A
fused layer (wqkv, w13) holds its parts side by side: A's columns and B's rows per part, B block-diagonal.
Under model parallelism each rank's bank holds the factors sliced like its weight (B's rows for a layer split on
its output, A's columns for one split on its input: the partial x·A·B is summed by the layer's all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class LoraSelection:
    """Which adapter slot each token of the current model call uses: groups of (slot, token indices into the
    flattened (B*S) tokens), or with `gathered` one slot per token (-1: none) computed row by row."""

    groups: List[Tuple[int, torch.Tensor]] = field(default_factory=list)
    whole: Optional[int] = None  # every token uses this slot: no gather
    gathered: Optional[torch.Tensor] = None  # deterministic: (T,) slots, -1 mapped to the zero slot


class LoraBank:
    """One layer's stacked factors: a (slots + 1, in, parts * rank), b (slots + 1, parts * rank, out); the last
    slot stays zero (rows without an adapter in `gathered` mode). `parts`: (Meta weight key, first output
    column, output columns) of each weight the layer computes."""

    def __init__(self, parts: Sequence[Tuple[str, int, int]], in_features: int, out_features: int, slots: int,
                 rank: int, dtype: torch.dtype, device: torch.device, state: "LoraSet") -> None:
        self.parts = list(parts)
        self.rank = rank
        self.state = state
        width = rank * len(self.parts)
        self.a = torch.zeros(slots + 1, in_features, width, dtype=dtype, device=device)
        self.b = torch.zeros(slots + 1, width, out_features, dtype=dtype, device=device)

    def load(self, slot: int, factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put one adapter's factors (per Meta key: A (r, in), scale * B (out, r), this rank's slices) in `slot`;
        parts the adapter does not target stay zero."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for j, (key, first, cols) in enumerate(self.parts):
            if key not in factors:
                continue
            a, b = factors[key]
            r = a.shape[0]
            self.a[slot, :, j * self.rank:j * self.rank + r] = a.t().to(self.a.dtype)
            self.b[slot, j * self.rank:j * self.rank + r, first:first + cols] = b.t().to(self.b.dtype)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base product of x) plus each selected token's x·A·B."""
        sel = self.state.selection
        if sel is None:
            return y
        if sel.whole is not None:
            return y + (x @ self.a[sel.whole].to(x.dtype)) @ self.b[sel.whole].to(x.dtype)
        flat_x = x.reshape(-1, x.shape[-1])
        if sel.gathered is not None:
            a, b = self.a.index_select(0, sel.gathered), self.b.index_select(0, sel.gathered)
            term = torch.bmm(torch.bmm(flat_x.unsqueeze(1), a.to(x.dtype)), b.to(x.dtype))
            return y + term.view(y.shape)
        flat_y = y.reshape(-1, y.shape[-1]).clone()
        for slot, index in sel.groups:
            rows = flat_x.index_select(0, index)
            flat_y.index_add_(0, index, (rows @ self.a[slot].to(x.dtype)) @ self.b[slot].to(x.dtype))
        return flat_y.view(y.shape)


class LoraSet:
    """The banks of one model and the selection of the call in progress (set by `select`, cleared by `clear`)."""

    def __init__(self, slots: int, rank: int) -> None:
        self.slots, self.rank = slots, rank
        self.banks: List[LoraBank] = []
        self.selection: Optional[LoraSelection] = None
        self.names: List[Optional[str]] = [None] * slots  # what each slot holds

    @property
    def active(self) -> bool:
        return self.selection is not None

    def load(self, slot: int, name: str, factors_for) -> None:
        """Fill `slot` in every bank: factors_for(keys) gives {key: (A, scale*B)} for this rank."""
        for bank in self.banks:
            bank.load(slot, factors_for([key for key, _, _ in bank.parts]))
        self.names[slot] = name

    def select(self, slots: Sequence[int], per: int, device: torch.device, gathered: bool = False) -> None:
        """Slots per row (-1: none), each repeated for `per` consecutive tokens (decode: 1; a row of S tokens: S),
        or with per=0 one slot per token as given. No adapter anywhere: no selection at all."""
        per_token = list(slots) if per == 0 else [s for s in slots for _ in range(per)]
        if all(s < 0 for s in per_token):
            self.selection = None
            return
        if gathered:
            zero = self.slots  # the bank's always-zero slot
            self.selection = LoraSelection(gathered=torch.tensor([s if s >= 0 else zero for s in per_token],
                                                                 device=device))
            return
        kinds = set(per_token)
        if len(kinds) == 1:
            self.selection = LoraSelection(whole=per_token[0])
            return
        groups = []
        for slot in sorted(k for k in kinds if k >= 0):
            index = [i for i, s in enumerate(per_token) if s == slot]
            groups.append((slot, torch.tensor(index, device=device)))
        self.selection = LoraSelection(groups=groups)

    def clear(self) -> None:
        self.selection = None


def attach(model, slots: int, rank: int) -> LoraSet:
    """Give every adapted linear layer of `model` (wq/wk/wv or fused wqkv, wo, w1/w3 or fused w13, w2) a bank of
    `slots` adapters of rank up to `rank`, in the model's dtype on its device; returns the model's LoraSet (also
    `model.loras_bank`)."""
    lora = LoraSet(slots, rank)
    device = model.rope.device
    dtype = model.tok_embeddings.weight.dtype
    for i, layer in enumerate(model.layers):
        attn, ff = layer.attention, layer.feed_forward
        groups = []
        if attn.wqkv is not None:
            groups.append((attn.wqkv, ["wq", "wk", "wv"], attn.qkv_sizes, "attention"))
        else:
            groups += [(getattr(attn, n), [n], None, "attention") for n in ("wq", "wk", "wv")]
        groups.append((attn.wo, ["wo"], None, "attention"))
        if ff.w13 is not None:
            groups.append((ff.w13, ["w1", "w3"], ff.w13_sizes, "feed_forward"))
        else:
            groups += [(getattr(ff, n), [n], None, "feed_forward") for n in ("w1", "w3")]
        groups.append((ff.w2, ["w2"], None, "feed_forward"))
        for module, names, sizes, parent in groups:
            world = module.world
            out_local = module.out_features // world if module.split_dim == 0 else module.out_features
            in_local = module.in_features // world if module.split_dim == 1 else module.in_features
            sizes = sizes or [out_local]
            firsts = [sum(sizes[:j]) for j in range(len(sizes))]
            parts = [(f"layers.{i}.{parent}.{n}.weight", first, cols) for n, first, cols in zip(names, firsts, sizes)]
            module.lora = LoraBank(parts, in_local, out_local, slots, rank, dtype, device, lora)
            lora.banks.append(module.lora)
    model.lora_set = lora
    return lora
