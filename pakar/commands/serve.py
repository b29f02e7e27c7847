"""`pakar serve`: the OpenAI-compatible HTTP server with the web chat page (pakar.serve).

The parser and the range checks need only pakar.args; fastapi (about a second) loads after them and
torch with the model, so `pakar serve --help` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import sys

from pakar import PakarError
from pakar.args import (API_KEY_ENV, DEFAULT_HEADER_TIMEOUT, DEFAULT_HOST, DEFAULT_MAX_BATCH, DEFAULT_MAX_CONNECTIONS,
                        DEFAULT_MAX_QUEUE, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_PORT)
from pakar.commands.common import add_quantize_arg, add_rag_args, open_retriever


def main_serve(argv: list[str], prog: str = "pakar serve") -> int:
    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible HTTP server (/v1/chat/completions, "
                                "/v1/completions, /v1/models, /health) with a web chat page at /.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="pakar model checkpoint (.pt) (default, without --model: the newest "
                     "checkpoints/model_epoch*.pt in the current folder)")
    src.add_argument("--model", dest="model_dir", help="Hugging Face Qwen3-MoE folder (e.g. from pakar export)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; 0.0.0.0 opens it "
                        f"to the network: set an API key and --allowed-hosts then)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT})")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set, else no "
                        f"key; prefer --api-key-file or the variable: a command line is visible to other users)")
    p.add_argument("--api-key-file", default=None, help="read the API key from the first line of this file")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated names clients may use in the Host header, '*' for any (default: "
                        "localhost,127.0.0.1,[::1] and the --host address); other names get 400, which stops "
                        "DNS-rebinding pages")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"largest request body in bytes; larger ones get 413 (default: {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                   help=f"seconds a connection gets to send a request's headers, and then its body; slower "
                        f"ones are closed (default: {DEFAULT_HEADER_TIMEOUT:g})")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help=f"open connections at most; more are closed on arrival (default: {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--model-name", default=None,
                   help="model id reported by /v1/models and expected in requests (default: the checkpoint's "
                        "file name or the folder's name)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: auto, cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight and cache dtype (default: auto, bfloat16 on a GPU that supports it, else float32)")
    add_quantize_arg(p)
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"completions generated together; more wait in a queue (default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"waiting completions before new requests get 429 (default: {DEFAULT_MAX_QUEUE})")
    add_rag_args(p)
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise PakarError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_batch < 1 or args.max_queue < 1:
        raise PakarError("--max-batch and --max-queue must be at least 1")
    if args.max_request_bytes < 1024:
        raise PakarError(f"--max-request-bytes must be at least 1024, got {args.max_request_bytes}")
    if not args.header_timeout > 0 or args.header_timeout == float("inf"):
        raise PakarError(f"--header-timeout must be a number of seconds > 0, got {args.header_timeout}")
    if args.max_connections < 1:
        raise PakarError(f"--max-connections must be at least 1, got {args.max_connections}")
    # lazy: fastapi (about a second), after the flags are checked
    from pakar.serve import Limits, fd_room, create_app, default_allowed_hosts, read_api_key, uvicorn_config

    api_key = read_api_key(args.api_key, args.api_key_file)
    hosts = (default_allowed_hosts(args.host) if args.allowed_hosts is None else
             tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()))
    if not hosts:
        raise PakarError("--allowed-hosts is empty (use '*' to allow any Host header)")
    max_connections = fd_room(args.max_connections)
    if max_connections < args.max_connections:
        print(f"WARNING: the open-file limit leaves room for {max_connections} connections, not "
              f"--max-connections {args.max_connections}", file=sys.stderr)
    limits = Limits(args.max_request_bytes, args.header_timeout, max_connections, hosts)

    import uvicorn  # lazy: with fastapi above

    from pakar.chat import default_model_name, load_generator  # lazy: torch

    retriever = open_retriever(args)
    textgen, path = load_generator(args.checkpoint, args.model_dir, args.device, args.dtype, quantize=args.quantize)
    name = args.model_name or default_model_name(path)
    app = create_app(textgen, name, api_key, args.max_batch, args.max_queue, limits, retriever)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"WARNING: listening on {args.host} without an API key: anyone who can reach this machine can "
              f"use the model", file=sys.stderr)
    print(f"serving {name!r} ({'chat' if textgen.chat else 'text'} model, context {textgen.context_window} tokens) on "
          f"http://{args.host}:{args.port}/  (OpenAI base URL: http://{args.host}:{args.port}/v1)", flush=True)
    uvicorn.Server(uvicorn_config(app, limits, host=args.host, port=args.port, log_level="info")).run()
    return 0
