"""What the benchmarks share: the kernel report of a built model, and paired timings in alternation."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from llama import cpu
from llama.model import Transformer, _PackableLinear


def kernel_report(model: Transformer, path: Optional[cpu.LinearPath]) -> Dict[str, object]:
    """Which linear path ran, counted from the model itself (not from what was asked for), and why."""
    linears = [m for m in model.modules() if isinstance(m, _PackableLinear)]
    packed = sum(m.packed for m in linears)
    info = cpu.info()
    return {
        "cpu": info.model,
        "cpu_flags": sorted(info.flags),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "linear_path": path.name if packed else "aten (plain F.linear)",
        "linear_path_detail": path.detail if packed else "PyTorch's F.linear in the model's dtype",
        "packed_linear_modules": f"{packed} of {len(linears)}",
        "weights_kept_plain": path.plain if packed else None,
        "omp_wait_policy": cpu.wait_policy(),
        "describe": cpu.describe(path if packed else None),
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(a: Callable[[], float], b: Callable[[], float], pairs: int) -> Dict[str, object]:
    """Rates from a() and b() measured in alternation (a b a b ...); medians and the median pairwise ratio.

    On a shared machine the load drifts: only side-by-side runs compare fairly."""
    runs: List[tuple] = [(a(), b()) for _ in range(pairs)]
    return {"a": round(statistics.median(x for x, _ in runs), 2), "b": round(statistics.median(y for _, y in runs), 2),
            "ratio": round(statistics.median(x / y for x, y in runs), 2),
            "each_pair": [round(x / y, 2) for x, y in runs]}
