"""Many LoRA adapters on one unmerged base: per adapted linear layer a bank of stacked A and B factors, and the
per-token choice of adapter that every layer of one model call reads.

A layer computes its base product on its own kernels (plain, packed, quantized, fused) and then adds, for each
token with an adapter, x·A·B (the scale folded into B), in two products per weight whatever the mix of adapters:
x times the A of every slot in use side by side, masked so that each token keeps only its own adapter's columns
(exact zeros elsewhere), times the B of those slots stacked. Each adapter's factors are read once per call however
many rows use it (what punica's BGMV gather achieves on a GPU, without a Python loop over adapters); tokens with
no adapter get exact zeros. A call whose tokens all use one adapter multiplies by its factors alone. On a CPU in
bfloat16 one C call does it instead (llama/cpu/csrc/lora.c through fused_lora.BankTerm, the fused decoding
step's own term): each token's x·A·B grouped by adapter, with no arithmetic for the other slots. Deterministic
mode reads every slot in every step, so that a row's arithmetic never depends on which adapters its neighbours use.

A bank has `slots` entries of rank `rank` (adapters of lower rank are zero-padded, which adds exact zeros). A
fused layer (wqkv, w13) holds its parts' factors apart and adds each part's term to its own output columns.
Under model parallelism each rank's bank holds the factors sliced like its weight (B's rows for a layer split on
its output, A's columns for one split on its input: the partial x·A·B is summed by the layer's all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class LoraSelection:
    """Which adapter slot each token of the current model call uses. `whole`: every token the same slot (no
    mask). Otherwise slots 0..used-1 are read and `mask` (T, used * rank) keeps, for each token, only its own
    slot's rank columns of x·A (exact zeros elsewhere, so x·A·B sums only its own adapter's terms). `slots`: each
    token's slot (-1: none), as the fused CPU step reads them (llama/model/fused_lora.py)."""

    whole: Optional[int] = None
    used: int = 0
    mask: Optional[torch.Tensor] = None
    slots: Tuple[int, ...] = ()
    slot_ids: Optional[torch.Tensor] = None  # `slots` as int32 on the host, for lora.c (fused_lora.BankTerm)


class LoraBank:
    """One layer's stacked factors, per part p (a weight the layer computes: wq, wk, wv of a fused wqkv):
    a[p] (in, slots, rank) and b[p] (slots, rank, out_p), the scale folded into b. `parts`: (Meta weight key,
    first output column, output columns) of each. Slots 0..k-1 of a part are views (no copy): A as one
    (in, k * rank) matrix with a row stride of slots * rank, B as (k * rank, out_p)."""

    def __init__(self, parts: Sequence[Tuple[str, int, int]], in_features: int, out_features: int, slots: int,
                 rank: int, dtype: torch.dtype, device: torch.device, state: "LoraSet") -> None:
        self.parts = list(parts)
        self.rank = rank
        self.state = state
        self.in_features, self.out_features = in_features, out_features
        self.a = [torch.zeros(in_features, slots, rank, dtype=dtype, device=device) for _ in self.parts]
        self.b = [torch.zeros(slots, rank, cols, dtype=dtype, device=device) for _, _, cols in self.parts]
        self.native = None  # bfloat16 on a CPU: the C term (llama/model/fused_lora.py's BankTerm); False: none

    def load(self, slot: int, factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put one adapter's factors (per Meta key: A (r, in), scale * B (out, r), this rank's slices) in `slot`;
        parts the adapter does not target stay zero, as do the ranks above its own."""
        for j, (key, _, _) in enumerate(self.parts):
            self.a[j][:, slot].zero_()
            self.b[j][slot].zero_()
            if key in factors:
                a, b = factors[key]
                r = a.shape[0]
                self.a[j][:, slot, :r] = a.t().to(self.a[j].dtype)
                self.b[j][slot, :r] = b.t().to(self.b[j].dtype)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base product of x) plus each selected token's x·A·B."""
        sel = self.state.selection
        if sel is None:
            return y
        flat_x = x.reshape(-1, x.shape[-1])
        flat_y = y.reshape(-1, y.shape[-1])
        if self.native is None:
            from . import fused_lora
            self.native = fused_lora.BankTerm(self) if fused_lora.BankTerm.serves(self) else False
        if self.native and sel.slot_ids is not None and self.native(flat_x, flat_y, sel.slot_ids):
            return flat_y.view(y.shape)
        for (_, first, cols), a, b in zip(self.parts, self.a, self.b):
            if sel.whole is not None:
                h = flat_x @ a[:, sel.whole]
                flat_y[:, first:first + cols] += h @ b[sel.whole]
            else:
                k = sel.used
                h = (flat_x @ a[:, :k].reshape(self.in_features, k * self.rank)).mul_(sel.mask)
                flat_y[:, first:first + cols] += h @ b[:k].reshape(k * self.rank, cols)
        return flat_y.view(y.shape)


class LoraSet:
    """The banks of one model and the selection of the call in progress (set by `select`, cleared by `clear`)."""

    def __init__(self, slots: int, rank: int) -> None:
        self.slots, self.rank = slots, rank
        self.banks: List[LoraBank] = []
        self.selection: Optional[LoraSelection] = None
        self.names: List[Optional[str]] = [None] * slots  # what each slot holds
        self.dtype = torch.float32

    @property
    def active(self) -> bool:
        return self.selection is not None

    def load(self, slot: int, name: str, factors_for) -> None:
        """Fill `slot` in every bank: factors_for(keys) gives {key: (A, scale*B)} for this rank."""
        for bank in self.banks:
            bank.load(slot, factors_for([key for key, _, _ in bank.parts]))
        self.names[slot] = name

    def select(self, slots: Sequence[int], per: int, device: torch.device, fixed: bool = False) -> None:
        """Slots per row (-1: none), each repeated for `per` consecutive tokens (decode: 1; a row of S tokens: S),
        or with per=0 one slot per token as given. No adapter anywhere: no selection at all. fixed: read every
        slot whatever the rows use (deterministic mode: a row's arithmetic must not depend on its neighbours)."""
        per_token = list(slots) if per == 0 else [s for s in slots for _ in range(per)]
        if all(s < 0 for s in per_token):
            self.selection = None
            return
        if len(set(per_token)) == 1 and not fixed:
            self.selection = LoraSelection(whole=per_token[0], slots=tuple(per_token), slot_ids=_ids(per_token))
            return
        used = self.slots if fixed else max(per_token) + 1
        ids = torch.tensor(per_token)
        onehot = torch.zeros(len(per_token), used + 1, 1, dtype=self.dtype)
        onehot[torch.arange(len(per_token)), ids.where(ids >= 0, used)] = 1  # column `used`: no adapter, dropped
        onehot = onehot[:, :used]
        mask = onehot.expand(-1, -1, self.rank).reshape(len(per_token), used * self.rank)
        self.selection = LoraSelection(used=used, mask=mask.to(device, non_blocking=True), slots=tuple(per_token),
                                       slot_ids=_ids(per_token))

    def clear(self) -> None:
        self.selection = None


def _ids(slots: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(slots), dtype=torch.int32)


def attach(model, slots: int, rank: int) -> LoraSet:
    """Give every adapted linear layer of `model` (wq/wk/wv or fused wqkv, wo, w1/w3 or fused w13, w2) a bank of
    `slots` adapters of rank up to `rank`, in the model's dtype on its device; returns the model's LoraSet (also
    `model.loras_bank`)."""
    lora = LoraSet(slots, rank)
    device = model.rope.device
    dtype = lora.dtype = model.tok_embeddings.weight.dtype
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
