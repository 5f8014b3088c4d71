"""What the benchmarks share: the kernel report of a built model, and paired timings in alternation."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch

from llama import cpu
from llama.model import Transformer


def kernel_report(model: Transformer) -> Dict[str, object]:
    """Which linear kernels ran, counted from the model itself (not from what was asked for), and why."""
    counts = cpu.kernel_counts(model)
    info = cpu.info()
    return {
        "cpu": info.model,
        "cpu_flags": sorted(info.flags),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "linear_kernels": counts,
        "packed_linear_modules": f"{sum(n for name, n in counts.items() if name != 'aten')} of {sum(counts.values())}",
        "omp_wait_policy": cpu.wait_policy(),
        "describe": cpu.describe(model),
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


def add_run_options(parser) -> None:
    """--threads and --layers, which every model benchmark takes (see `apply_run_options`)."""
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count (quicker runs)")


def apply_run_options(opts, presets: Dict[str, dict]) -> None:
    """Set torch's thread count (--threads) and cut the chosen shape (--shape) to --layers layers in `presets`."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.layers:
        presets[opts.shape] = {**presets[opts.shape], "n_layers": opts.layers}
