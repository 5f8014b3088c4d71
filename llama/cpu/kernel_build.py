"""Compiling the C kernels (llama/cpu/csrc) once per machine, compiler and source, whatever the number of processes.

The shared library is cached (`LLAMA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/llama2-reference` or
`~/.cache/llama2-reference`) under a name hashed from everything that makes the binary: the sources, the machine
(`platform.machine()`: a home shared by x86 and ARM machines keeps one of each), the compiler's version and the
flags. Processes that start at once (torchrun's ranks, a test's workers) take a file lock: the first compiles,
the others wait and load its result. The first compile says so on stderr, one line, from rank 0 only.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))  # every C file of csrc/ is one library
HEADERS = sorted(CSRC.glob("*.h"))
CFLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-pthread", "-Wall"]
# Seconds a first compile takes, as the message says: 3.4 s of CPU with gcc 12 on a Zen 4, about 10 s wall on its
# 2 shared cores (2026-12-07).
TYPICAL_SECONDS = 10


def cache_dir() -> Path:
    """Where the compiled library is kept."""
    if os.environ.get("LLAMA_KERNEL_CACHE"):
        return Path(os.environ["LLAMA_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama2-reference"


def compiler() -> Optional[str]:
    """The C compiler: `CC`, else cc, gcc or clang on PATH; None without one."""
    for name in ([os.environ["CC"]] if os.environ.get("CC") else []) + ["cc", "gcc", "clang"]:
        path = shutil.which(name.split()[0])
        if path:
            return path
    return None


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def command(cc: str, out: str, flags: Sequence[str] = CFLAGS) -> List[str]:
    """The compiler's command line for the library at `out` (tests add -Werror)."""
    return [cc, *flags, "-o", out, *map(str, SOURCES), "-lm"]


def key(cc: str, flags: Sequence[str] = CFLAGS) -> str:
    """The cache key: the sources, the machine and OS, the compiler's version and the flags."""
    parts = [path.read_bytes() for path in HEADERS + SOURCES]
    parts += [platform.machine().encode(), sys.platform.encode(), _compiler_version(cc).encode(),
              " ".join(flags).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _is_rank_zero() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK"))


def build(force: bool = False) -> Path:
    """Compile the kernels (if not cached) and return the shared library's path. Raises RuntimeError saying why
    it could not: no compiler, or the compiler's own message."""
    if sys.platform == "win32":
        raise RuntimeError("the C kernels are built on Linux and macOS only")
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    target = cache_dir() / f"qlinear-{platform.machine() or 'cpu'}-{key(cc)}.so"
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if target.exists() and not force:  # another process built it while this one waited
            return target
        if _is_rank_zero():
            print(f"compiling CPU kernels (once, ~{TYPICAL_SECONDS} s)…", file=sys.stderr, flush=True)
        _compile(cc, target)
    return target


def _compile(cc: str, target: Path) -> None:
    # A temporary name in the same folder, renamed into place: a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=".qlinear-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        start = time.monotonic()
        result = subprocess.run(command(cc, tmp), capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(result.stderr or result.stdout).strip()[-2000:]}")
        os.replace(tmp, target)
        if os.environ.get("LLAMA_LOG", "").lower() == "debug":
            print(f"compiled {target} in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
