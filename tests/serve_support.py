"""What the serving tests share: servers on 127.0.0.1 (in a thread, or `python -m llama.serve` in a subprocess),
and the checkpoints they serve (the demo model, a random one, a scripted one with known answers)."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import pytest

from helpers import ROOT

# Gradio (the web page) must not phone home, whichever test imports it first.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DEMO = ROOT / "demo" / "fortune-llama"
TIMEOUT = 60  # seconds any single wait in these tests may take before it fails


def free_socket() -> socket.socket:
    """A listening socket on a free loopback port: clients may connect before the server starts serving."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP: asyncio sets NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class Gate:
    """Wraps the engine's step runner so a test decides how many more steps may run: `allow(n)` lets n steps
    through, then the engine thread waits inside its next step (requests can still arrive and be refused)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.cond = threading.Condition()
        self.left: Optional[int] = None  # None: open

    def allow(self, n: Optional[int]) -> None:
        with self.cond:
            self.left = n
            self.cond.notify_all()

    def run(self, plan):
        with self.cond:
            if not self.cond.wait_for(lambda: self.left is None or self.left > 0, TIMEOUT):
                raise TimeoutError("the test never opened the gate")
            if self.left is not None:
                self.left -= 1
        return self.runner.run(plan)

    def close(self) -> None:
        self.allow(None)
        self.runner.close()


class ThreadServer:
    """The API (and optionally the web page) over an engine, served by uvicorn in a thread of this process."""

    def __init__(self, generator, model: str = "test-model", max_queue: int = 64, api_key: Optional[str] = None,
                 max_body_bytes: int = 1 << 20, web: bool = False, config: Optional[dict] = None,
                 **app_kwargs) -> None:
        """config: uvicorn/connection settings for server_config; app_kwargs: more create_app arguments (shield...)."""
        import uvicorn

        from llama.serve.api import create_app
        from llama.serve.connections import server_config
        from llama.serve.scheduler import Engine

        self.generator = generator
        self.model = model
        self.engine = Engine(generator, max_queue=max_queue)
        self.gate = self.engine.runner = Gate(self.engine.runner)
        self.app = create_app(self.engine, model, api_key=api_key, max_body_bytes=max_body_bytes, **app_kwargs)
        if web:
            from llama.serve import web as web_page

            web_page.mount(self.app, self.engine, model, api_key=api_key)
        self.sock = free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(server_config(self.app, **{"log_level": "warning", "timeout_graceful_shutdown": 5,
                                                                **(config or {})}))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.engine.start()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.gate.allow(None)
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.engine.stop(timeout=TIMEOUT, cancel=True)
        self.sock.close()

    def wait_idle(self) -> None:
        assert self.engine.wait_idle(TIMEOUT), self.engine.stats()

    def openai(self, **kwargs):
        openai = pytest.importorskip("openai")
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"),
                             timeout=TIMEOUT, max_retries=0, **kwargs)


class ProcessServer:
    """`python -m llama.serve` (or under torchrun) in a subprocess; its output is read line by line."""

    def __init__(self, args: Sequence[str], nproc: int = 0, module: str = "llama.serve") -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    "-m"] if nproc else [sys.executable, "-m"]
        # A session of its own, so that kill() ends torchrun's workers too, whatever state they are in.
        self.proc = subprocess.Popen([*launcher, module, "--port", "0", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.output: List[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        match = self.wait_for(r"Serving .* on (http://\S+) \(pid (\d+)")
        self.url, self.pid = match.group(1), int(match.group(2))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str) -> re.Match:
        """The first line of output matching `pattern`; fails on exit or after TIMEOUT seconds."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail(f"no line matching {pattern!r} in {TIMEOUT} s:\n" + "".join(self.output[-40:]))
            if line is None:
                pytest.fail(f"the server exited ({self.proc.wait()}) before {pattern!r}:\n" +
                            "".join(self.output[-40:]))
            self.output.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def terminate(self) -> int:
        """SIGTERM to the serving process (rank 0); the exit status of the whole run."""
        os.kill(self.pid, signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            self.kill()

    def kill(self) -> None:
        """End the server and every process it started (its session), if any is left."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(TIMEOUT)

    def text(self) -> str:
        while True:  # what is left of the output, once the process has ended
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
        return "".join(self.output)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT, every: float = 0.02) -> None:
    """Poll a condition that nothing can signal (another process's state) until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def noticed(server: ThreadServer, cancelled: int) -> None:
    """Wait until the server has cancelled the request whose client left: its row is freed, or will be at the
    next step boundary while the gate holds the engine (`cancelled`: the count of cancelled requests by then)."""
    engine = server.engine
    wait_until(lambda: engine.cancelling() == 1 or engine.finished["cancelled"] == cancelled,
               "the server to notice the disconnection")


def ports_refuse(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return False
    except OSError:
        return True


def demo_paths() -> List[str]:
    return ["--ckpt_dir", str(DEMO), "--tokenizer_path", str(DEMO / "tokenizer.model")]


def skip_without(*modules: str) -> None:
    for name in modules:
        pytest.importorskip(name, reason=f"{name} is not installed: pip install -e \".[test]\"")


__all__ = ["ThreadServer", "Gate", "noticed", "ProcessServer", "wait_until", "free_socket", "demo_paths", "DEMO", "TIMEOUT",
           "ports_refuse", "skip_without", "Path"]
