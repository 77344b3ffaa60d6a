"""`argen serve --pipeline DIR [--unclip DIR]`: a local web page to sample and compare (see argen.serve)."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from argen.cli.args import device, int_in, positive_int

INSTALL_HINT = "pip install 'argen[serve]'"
LOOPBACK = "127.0.0.1"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local web page: type prompts, compare the GPT with unCLIP priors, download",
                       description="Serve a web page that samples from a GPT pipeline (and the priors of a unCLIP "
                                   f"pipeline, side by side). Needs the serve extra: {INSTALL_HINT}.")
    p.add_argument("--pipeline", default=None, help="GPT pipeline directory (pipeline.json; argen train gpt ... final/)")
    p.add_argument("--unclip", default=None, help="unCLIP pipeline directory (unclip.json): one column per prior")
    p.add_argument("--host", default=LOOPBACK, help=f"address to listen on (default {LOOPBACK}: this machine only; "
                   "0.0.0.0 lets anyone on the network use the page and this CPU, with no login)")
    p.add_argument("--port", type=int_in(0, 65535), default=7860, help="TCP port (default 7860; 0 picks a free one)")
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-waiting", type=positive_int, default=8,
                   help="jobs that may wait behind the running one; more are refused with HTTP 503 (default 8)")
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing the parts (faster start for big models)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        print(f"argen serve: error: the web page needs the serve extra: {INSTALL_HINT}", file=sys.stderr)
        return 2
    import torch

    from argen.pipeline import recommended_sampling
    from argen.serve.app import create_app
    from argen.serve.jobs import JobQueue, load_systems
    from argen.serve.settings import Form

    if args.pipeline is None and args.unclip is None:
        print("argen serve: error: give --pipeline DIR (a GPT pipeline), --unclip DIR, or both.", file=sys.stderr)
        return 2
    sock = listen(args.host, args.port)  # before loading models, so a busy port fails at once
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    systems = load_systems(args.pipeline, args.unclip, device=dev, verify=not args.no_verify)
    gpt = next((s for s in systems if s.info.family == "gpt"), None)
    defaults = recommended_sampling(gpt.pipe.manifest if gpt is not None else {})
    form = Form([s.info for s in systems], defaults=defaults)
    queue = JobQueue(systems, max_waiting=args.max_waiting)
    app = create_app(queue, form, title=f"argen: {args.pipeline or args.unclip}")
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"argen serve: http://{shown}:{port}/ ({'; '.join(s.info.name for s in systems)}; on {dev}). Ctrl-C stops.")
    if not ipaddress.ip_address(host).is_loopback:
        print(f"note: listening on {host}: anyone who can reach this machine can use the page and its {dev}; there is "
              "no login.")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (an address or a name); OSError naming the address and the fix when it
    cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise OSError(f"--host {host!r} does not resolve ({err.strerror}); use {LOOPBACK} (this machine) or 0.0.0.0 "
                      "(every interface).") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port, or stop what uses it.") from None
    sock.listen(128)
    return sock
