"""`llama-serve`, `python -m llama serve`, `python -m llama.serve`: the OpenAI-compatible server (and with --web
the chat page) on uvicorn (needs the serve extra). llama/serve/__main__.py, which `python -m llama.serve` and
`torchrun -m llama.serve` run, only calls entry_point here.

    python -m llama.serve --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model --max_batch_size 8
    torchrun --nproc_per_node 2 -m llama.serve --ckpt_dir llama-2-13b-chat/ --tokenizer_path tokenizer.model

Binds 127.0.0.1 unless --host says otherwise. Under torchrun rank 0 serves HTTP and runs the scheduler; the
other ranks run the same model calls, step by step (runner.follow), and ignore SIGTERM: rank 0 tells them
when to leave. SIGTERM (or Ctrl-C) on rank 0 drains: new requests get 503, running and queued ones finish
(within --drain_timeout, after which each ends with a last event saying so; 0: at once), then every rank exits
0. A second SIGTERM or Ctrl-C ends the drain at once, each request with its last event; a third Ctrl-C exits
without waiting for anything. After an engine failure (/health says "failed") the server stops and exits 1.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import math
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from ..generation import Llama
from ..model import distributed
from ..serve.limits import (BODY_TIMEOUT, HEADER_TIMEOUT, MAX_BODY_BYTES, MAX_CLIENT_CONNECTIONS, MAX_CONNECTIONS,
                            MAX_PREFILL_TOKENS, MAX_QUEUE)
from . import cli
from .cli import resolve_checkpoint, resolve_shield


def parse_args(argv: Optional[Sequence[str]] = None, web: bool = False) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        "python -m llama.web" if web else "python -m llama.serve",
        "Serve a Llama checkpoint over an OpenAI-compatible HTTP API (continuous batching"
        + ("; the chat page at /web" if web else "") + "). Run under torchrun for model parallelism.")
    cli.add_model_flags(parser, seed_help="seeds the requests that send no seed of their own", many_loras=True)
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    add("--port", type=int, default=8000, help="port (0: any free port; the chosen one is printed)")
    add("--model", default=None, help="model id clients name (default: the checkpoint folder's name)")
    add("--api-key", dest="api_key", default=os.environ.get("LLAMA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LLAMA_API_KEY; none: no key; an empty "
             "key is an error)")
    add("--allowed-hosts", dest="allowed_hosts", default="",
        help="comma-separated Host names served besides loopback names and the address connected to (e.g. the "
             "name a reverse proxy forwards; '*': any). Others get 400: this stops DNS rebinding")
    add("--allowed-origins", dest="allowed_origins", default="",
        help="comma-separated web origins (https://app.example) whose pages may call the API, with CORS; "
             "'*': any. Requests from other origins get 403")
    add("--max_seq_len", type=int, default=2048, help="context per request, prompt + answer")
    add("--max_batch_size", type=int, default=64,
        help="requests running (decoded together) at most; they are admitted by free KV blocks (--kv_cache_gib)")
    add("--max_queue", type=int, default=MAX_QUEUE,
        help="requests that may wait for a row; beyond it: 429 with Retry-After")
    add("--max_prefill_tokens", type=int, default=MAX_PREFILL_TOKENS,
        help="prompt tokens prefilled in one step at most (the first waiting request always is); bounds the "
             f"pause that admissions cause to running streams (default {MAX_PREFILL_TOKENS}; 0: no limit)")
    add("--max_body_bytes", type=int, default=MAX_BODY_BYTES, help="largest request body (413 above)")
    add("--max_connections", type=int, default=MAX_CONNECTIONS,
        help="open connections at most, idle ones included; beyond: 503, except for a few kept for GET /health "
             "and /metrics")
    add("--max_client_connections", type=int, default=None,
        help=f"open connections from one client address at most; beyond: 503 (default {MAX_CLIENT_CONNECTIONS}, "
             "or --max_connections if lower; behind a reverse proxy every client has the proxy's address)")
    add("--header_timeout", type=float, default=HEADER_TIMEOUT,
        help="seconds a request's headers may take to arrive")
    add("--body_timeout", type=float, default=BODY_TIMEOUT,
        help="seconds a request's body may take to arrive; beyond: 408")
    add("--drain_timeout", type=float, default=None,
        help="seconds SIGTERM waits for running requests; then each ends with a last event (streams: "
             "finish_reason 'length' and [DONE]; others: a 503 error) (0: no wait; default: no limit)")
    add("--deterministic", action="store_true",
        help="a request's tokens never depend on what else is being served (every step has one shape, each "
             "prompt is prefilled alone; costs ~10%% at batch 1, see README)")
    add("--no-prefix-cache", dest="prefix_cache", action="store_false",
        help="prefill every prompt whole: no reuse of the keys and values of prompt starts that earlier requests "
             "shared (the prefix cache is on by default, except with --deterministic; see README)")
    add("--prefix_cache_gib", type=float, default=None, metavar="GIB",
        help="the most KV the prefix cache keeps, GiB per process (default: the whole KV pool; blocks no request "
             "holds are evicted least recently used first when needed)")
    add("--kv_cache_gib", type=float, default=None, metavar="GIB",
        help="the paged KV cache's pool, GiB per process (default: what fits beside the weights, at most "
             "max_batch_size full contexts; printed at start)")
    add("--max_loras", type=int, default=None,
        help="LoRA adapters held in memory at once (default: all given with --lora NAME=PATH); others load on "
             "demand, least recently used out; a request waits while every slot is busy")
    add("--max_lora_rank", type=int, default=None,
        help="the largest LoRA rank the adapter banks take, up to 64 (default: the largest given)")
    add("--enable_lora_loading", action="store_true",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind the API key)")
    add("--chat-template", dest="chat_template", default=None, metavar="FILE",
        help="a Jinja chat template for chat prompts, rendered as transformers renders it (default: a Hugging Face "
             "checkpoint's own tokenizer_config.json template, else the family's Meta format)")
    add("--shield", default=None, metavar="CKPT",
        help="a Llama Guard checkpoint folder: chat messages and whole answers rated unsafe are refused (400)")
    cli.add_speculation_flags(parser)
    add("--web", action="store_true", default=web, help="also serve the chat page at /web (needs gradio)")
    add("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; OSError naming the port and the flag to change when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP; without
    # it each streamed chunk after a connection's first response waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise OSError(err.errno, f"port {port} on {host} is already in use (another server?): choose another "
                                     "with --port (--port 0 picks a free one)") from None
        if err.errno == errno.EACCES:
            raise OSError(err.errno, f"no permission to listen on port {port}: ports below 1024 need "
                                     "privileges; choose another with --port") from None
        raise OSError(err.errno, f"cannot listen on {host}:{port} (--host, --port): {err.strerror}") from None
    sock.listen(2048)  # listening from here on: a client that connects before uvicorn starts waits, not fails
    return sock


def _check_limits(args: argparse.Namespace) -> None:
    """ValueError naming the first server limit flag out of range."""
    if args.max_queue < 0 or args.max_body_bytes < 1:
        raise ValueError("--max_queue must be >= 0 and --max_body_bytes >= 1")
    if args.max_prefill_tokens < 0:
        raise ValueError(f"--max_prefill_tokens must be >= 0 (0: no limit), got {args.max_prefill_tokens}")
    if args.max_connections < 1:
        raise ValueError(f"--max_connections must be >= 1, got {args.max_connections}")
    if args.max_client_connections is not None and args.max_client_connections < 1:
        raise ValueError(f"--max_client_connections must be >= 1, got {args.max_client_connections}")
    for name in ("header_timeout", "body_timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a number of seconds > 0, got {value}")
    if args.drain_timeout is not None and not (math.isfinite(args.drain_timeout) and args.drain_timeout >= 0):
        raise ValueError(f"--drain_timeout must be a number of seconds >= 0 (0: no wait), got {args.drain_timeout}")
    if args.prefix_cache_gib is not None and not (math.isfinite(args.prefix_cache_gib) and args.prefix_cache_gib > 0):
        raise ValueError(f"--prefix_cache_gib must be a positive number of GiB, got {args.prefix_cache_gib}")
    if args.kv_cache_gib is not None and not (math.isfinite(args.kv_cache_gib) and args.kv_cache_gib > 0):
        raise ValueError(f"--kv_cache_gib must be a positive number of GiB, got {args.kv_cache_gib}")
    if args.prefix_cache_gib is not None and not args.prefix_cache:
        raise ValueError("--prefix_cache_gib sizes the prefix cache, which --no-prefix-cache turns off: give one")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("the API key is empty (--api-key or $LLAMA_API_KEY): give a non-empty key, or none for "
                         "a server without a key")


def main(argv: Optional[Sequence[str]] = None, web: bool = False) -> int:
    args = parse_args(argv, web)
    try:
        _check_limits(args)
        ckpt_dir, tokenizer_path = resolve_checkpoint(args.ckpt_dir, args.tokenizer_path)
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
        lora, lora_options = _loras(args)
        generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=args.max_seq_len,
                                max_batch_size=args.max_batch_size, seed=args.seed, device=args.device,
                                dtype=args.dtype, lora=lora, **lora_options, quantize=args.quantize,
                                group_size=args.group_size, family=args.family, deterministic=args.deterministic,
                                speculative=args.speculative, num_draft_tokens=args.num_draft_tokens,
                                prefix_cache=args.prefix_cache, prefix_cache_gib=args.prefix_cache_gib,
                                kv_cache_gib=args.kv_cache_gib, kv_dtype=args.kv_dtype,
                                chat_template=args.chat_template)
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

    from ..engine import Runner
    from ..serve.api import create_app
    from ..serve.connections import server_config
    from ..serve.scheduler import Scheduler

    model = args.model or default_model
    runner = Runner(generator.decode_step, channel)
    engine = Scheduler(generator, max_queue=args.max_queue, seed=args.seed, runner=runner,
                       max_prefill_tokens=args.max_prefill_tokens or None)
    app = create_app(engine, model, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     body_timeout=args.body_timeout, allowed_hosts=_names(args.allowed_hosts),
                     allowed_origins=_names(args.allowed_origins), shield=getattr(args, "shield_model", None),
                     lora_loading=args.enable_lora_loading)
    if args.web:
        from ..serve import web

        web.mount(app)  # the app's engine, model and API key
    engine.start()

    class Server(uvicorn.Server):
        signals = 0

        def handle_exit(self, sig: int, frame) -> None:
            self.signals += 1
            if self.signals == 1:
                if args.drain_timeout is not None:
                    timer = threading.Timer(args.drain_timeout, engine.abort,
                                            [f"the server shut down: --drain_timeout ({args.drain_timeout:g} s) "
                                             "ran out before this answer was finished"])
                    timer.daemon = True
                    timer.start()
                engine.drain()  # from now on new requests get 503; running ones go on
                super().handle_exit(sig, frame)
            elif self.signals == 2:  # stop draining: every request ends now, with its last event
                engine.abort("the server shut down (stopped a second time) before this answer was finished")
            else:  # a third time: exit without waiting
                super().handle_exit(signal.SIGINT, frame)

    # uvicorn's own grace period comes after ours, so the requests' last events are written before it cancels.
    grace = None if args.drain_timeout is None else math.ceil(args.drain_timeout) + 5
    config = server_config(app, header_timeout=args.header_timeout, max_connections=args.max_connections,
                           max_client_connections=args.max_client_connections, log_level=args.log_level,
                           timeout_graceful_shutdown=grace,
                           access_log=False)  # the app logs one line per request, with its ID (metrics.RequestID)
    server = Server(config)
    engine.on_failure = lambda message: setattr(server, "should_exit", True)  # /health says failed; we stop
    # uvicorn raises the signal that stopped it again once it has shut down; this handler makes that a no-op,
    # so a drained server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"Serving {model!r} on http://{shown}:{port} (pid {os.getpid()}, max_batch_size "
          f"{engine.max_batch_size}, queue {engine.max_queue}, max_seq_len {engine.max_seq_len}"
          f"{', API key required' if args.api_key else ''}; chat prompts: {generator.prompts.describe()})"
          + (f"; chat page: http://{shown}:{port}/web" if args.web else ""), flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(cancel=True)  # after the drain nothing is left; after a crash, cancel what is
    if engine.failure is not None:
        print(f"Server stopped after an engine failure: {engine.failure}", file=sys.stderr, flush=True)
        return 1
    print("Server stopped.", flush=True)
    return 0


def _loras(args: argparse.Namespace):
    """--lora and its companions as Llama.build's lora= and options: one bare PATH merged, NAME=PATH pairs (or
    --enable_lora_loading alone, with --max_lora_rank) served beside the base. ValueError naming a bad value."""
    given = args.lora or []
    options = {"max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank}
    if len(given) == 1 and "=" not in given[0]:
        if args.max_loras is not None or args.enable_lora_loading:
            raise ValueError("--max_loras and --enable_lora_loading serve adapters beside the base: give --lora as "
                             "NAME=PATH")
        return given[0], {}
    adapters = {}
    for item in given:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora {item!r}: give NAME=PATH for each of several adapters")
        if name in adapters:
            raise ValueError(f"--lora names the adapter {name!r} twice")
        adapters[name] = path
    if not adapters and not args.enable_lora_loading:
        if args.max_loras is not None or args.max_lora_rank is not None:
            raise ValueError("--max_loras and --max_lora_rank need --lora NAME=PATH or --enable_lora_loading")
        return None, {}
    return adapters, options


def _names(value: str) -> list:
    return [name.strip() for name in value.split(",") if name.strip()]


def entry_point(web: bool = False) -> None:
    """`llama-serve`, `python -m llama serve`, `python -m llama.serve` (and with web=True `llama-web`, `python -m
    llama web`, `python -m llama.web`)."""
    from ..checkpoints.loading import verbose

    logging.basicConfig(level=logging.DEBUG if verbose() else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    cli.exit_with(lambda: main(web=web))
