"""`python -m llama.serve`: the OpenAI-compatible server (and with --web the chat page) on uvicorn.

    python -m llama.serve --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model --max_batch_size 8
    torchrun --nproc_per_node 2 -m llama.serve --ckpt_dir llama-2-13b-chat/ --tokenizer_path tokenizer.model

Binds 127.0.0.1 unless --host says otherwise. Under torchrun rank 0 serves HTTP and runs the scheduler; the
other ranks run the same model calls, step by step (runner.follow), and ignore SIGTERM: rank 0 tells them
when to leave. SIGTERM (or Ctrl-C) on rank 0 drains: new requests get 503, running and queued ones finish,
then every rank exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import distributed
from ..cli import resolve_checkpoint, resolve_shield
from ..generation import Llama


def parse_args(argv: Optional[Sequence[str]] = None, web: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llama.web" if web else "python -m llama.serve",
        description="Serve a Llama checkpoint over an OpenAI-compatible HTTP API (continuous batching"
                    + ("; the chat page at /web" if web else "") + "). Run under torchrun for model parallelism.")
    add = parser.add_argument
    add("--ckpt_dir", "--ckpt-dir", help="checkpoint folder (default with no --tokenizer_path: the demo model)")
    add("--tokenizer_path", "--tokenizer-path", help="tokenizer.model")
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    add("--port", type=int, default=8000, help="port (0: any free port; the chosen one is printed)")
    add("--model", default=None, help="model id clients name (default: the checkpoint folder's name)")
    add("--api-key", "--api_key", dest="api_key", default=os.environ.get("LLAMA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LLAMA_API_KEY; none: no key)")
    add("--max_seq_len", "--max-seq-len", type=int, default=2048, help="context per request, prompt + answer")
    add("--max_batch_size", "--max-batch-size", type=int, default=8, help="requests decoded together")
    add("--max_queue", "--max-queue", type=int, default=64,
        help="requests that may wait for a row; beyond it: 429 with Retry-After")
    add("--max_prefill_tokens", "--max-prefill-tokens", type=int, default=None,
        help="prompt tokens prefilled in one step at most (the first waiting request always is); bounds the "
             "pause that admissions cause to running streams (default: no limit)")
    add("--max_body_bytes", "--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    add("--drain_timeout", "--drain-timeout", type=float, default=None,
        help="seconds SIGTERM waits for running requests before cancelling them (default: no limit)")
    add("--device", default=None, help="cuda or cpu (default: cuda where there is one)")
    add("--dtype", default=None, help="bfloat16, float16 or float32")
    add("--seed", type=int, default=1, help="seeds the requests that send no seed of their own")
    add("--lora", default=None, help="PEFT LoRA adapter folder to merge into the weights")
    add("--quantize", choices=["int8", "int4"], default=None,
        help="weight-only quantization at load (a quantized checkpoint needs none)")
    add("--group_size", "--group-size", type=int, default=None, help="int4's inputs per scale: 32, 64 or 128")
    add("--family", default=None, choices=["llama2", "codellama", "llama3", "llamaguard"],
        help="the model's family (default: detected from the checkpoint)")
    add("--shield", default=None, metavar="CKPT",
        help="a Llama Guard checkpoint folder: chat messages and whole answers rated unsafe are refused (400)")
    add("--speculative", default=None, metavar="ngram|DRAFT_CKPT",
        help="speculative decoding: ngram (prompt lookup) or a draft checkpoint folder with the same tokenizer")
    add("--num_draft_tokens", "--num-draft-tokens", type=int, default=4, help="drafts checked per step")
    add("--web", action="store_true", default=web, help="also serve the chat page at /web (needs gradio)")
    add("--log_level", "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP; without
    # it each streamed chunk after a connection's first response waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # listening from here on: a client that connects before uvicorn starts waits, not fails
    return sock


def main(argv: Optional[Sequence[str]] = None, web: bool = False) -> int:
    args = parse_args(argv, web)
    try:
        ckpt_dir, tokenizer_path = resolve_checkpoint(args.ckpt_dir, args.tokenizer_path)
        if args.max_queue < 0 or args.max_body_bytes < 1:
            raise ValueError("--max_queue must be >= 0 and --max_body_bytes >= 1")
        if args.max_prefill_tokens is not None and args.max_prefill_tokens < 1:
            raise ValueError(f"--max_prefill_tokens must be >= 1, got {args.max_prefill_tokens}")
        for module in ["uvicorn", "llama.serve.api"] + (["llama.serve.web"] if args.web else []):
            importlib.import_module(module)  # a missing extra fails here, before the slow load
        rank0 = not distributed.launched() or int(os.environ.get("RANK", "0")) == 0
        sock = _bind(args.host, args.port) if rank0 else None  # a taken port fails before the slow load
        if not rank0:  # the other ranks must outlive rank 0's drain: rank 0 tells them when to leave
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        shield_files = resolve_shield(args.shield)
        if shield_files is not None and distributed.launched():
            raise ValueError("--shield runs in one process: start the server without torchrun to use it")
        if args.speculative not in (None, "ngram") and distributed.launched():
            raise ValueError("--speculative with a draft model runs in one process (ngram works under torchrun)")
        generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=args.max_seq_len,
                                max_batch_size=args.max_batch_size, seed=args.seed, device=args.device,
                                dtype=args.dtype, lora=args.lora, quantize=args.quantize,
                                group_size=args.group_size, family=args.family, speculative=args.speculative,
                                num_draft_tokens=args.num_draft_tokens)
        args.shield_model = None if shield_files is None else Llama.build(
            ckpt_dir=shield_files[0], tokenizer_path=shield_files[1], max_seq_len=args.max_seq_len + 1024,
            max_batch_size=1, seed=args.seed, device=args.device, dtype=args.dtype, family="llamaguard")
    except ImportError as err:
        print(f"error: {err}: install the extras with pip install -e \".[serve]\" (and \".[web]\" "
              "for the chat page)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        distributed.print0(f"error: {err}", file=sys.stderr)
        return 2
    from ..engine import follow

    channel = distributed.Broadcast()
    if channel.rank != 0:
        follow(generator.decode_step, channel)
        return 0
    return _serve(args, generator, channel, sock, Path(ckpt_dir).resolve().name)


def _serve(args: argparse.Namespace, generator: Llama, channel: distributed.Broadcast, sock: socket.socket,
           default_model: str) -> int:
    import uvicorn

    from .api import create_app
    from ..engine import Runner
    from .scheduler import Scheduler

    model = args.model or default_model
    engine = Scheduler(generator, max_queue=args.max_queue, seed=args.seed, runner=Runner(generator.decode_step, channel),
                    max_prefill_tokens=args.max_prefill_tokens)
    app = create_app(engine, model, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     shield=getattr(args, "shield_model", None))
    if args.web:
        from . import web

        web.mount(app, engine, model, api_key=args.api_key)
    engine.start()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            engine.drain()  # from now on new requests get 503; running ones go on
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout,
                            timeout_keep_alive=5)
    server = Server(config)
    # uvicorn raises the signal that stopped it again once it has shut down; this handler makes that a no-op,
    # so a drained server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"Serving {model!r} on http://{shown}:{port} (pid {os.getpid()}, max_batch_size "
          f"{engine.max_batch_size}, queue {engine.max_queue}, max_seq_len {engine.max_seq_len}"
          f"{', API key required' if args.api_key else ''})" + (f"; chat page: http://{shown}:{port}/web"
                                                                if args.web else ""), flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(cancel=True)  # after the drain nothing is left; after a crash, cancel what is
    print("Server stopped.", flush=True)
    return 0


def entry_point(web: bool = False) -> None:
    """`llama-serve`, `python -m llama serve` (and with web=True `llama-web`, `python -m llama web`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(web=web))


if __name__ == "__main__":
    entry_point()
