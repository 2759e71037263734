"""Front: `python -m model.serve [--checkpoint NAME] [--host 127.0.0.1] [--port 8000]`; also what
`python sample.py --serve` calls. Loads the model once, says what it serves and where, warns when
the address is reachable from other machines, and serves until Ctrl-C."""

from __future__ import annotations

import argparse
import socket
import sys
from typing import TextIO

from model.cli.common import (
    add_kernel_arguments,
    add_steering_arguments,
    check_steering,
    load_named_model,
    load_steering_option,
    run_cli,
    use_threads,
)
from model.errors import ConfigError, SamplingError
from model.runtime import pick_device

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
GRACE_S = 2  # at Ctrl-C, open streams get this long to end before the server closes them


def bind_warning(host: str) -> str | None:
    """What to tell the user before binding `host`, if it is not this machine only."""
    if host in LOCAL_HOSTS:
        return None
    return (f"warning: serving on {host}: anyone who can reach this address can use the model "
            "(there is no authentication); use --host 127.0.0.1 to keep it to this machine")


def run(name: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
        device: str = "auto", dtype: str = "auto", threads: int | None = None,
        max_tokens: int | None = None, err: TextIO | None = None, pack: bool = True,
        quantize: str | None = None, steer: str | None = None, steer_layer: int | None = None,
        steer_scale: float | None = None) -> int:
    """Load the model `name` and serve the playground and API on host:port until Ctrl-C.
    `device`, `dtype` and `threads` are as on the command line (see load_named_model);
    `max_tokens` caps the new tokens of one request; `pack`: the linear layers packed for oneDNN
    where the CPU can (model/network/packed.py); `quantize="int8"`: int8 weights instead
    (model/network/quantized.py); `steer`, `steer_layer`, `steer_scale`: a
    steering vector on every forward pass (--steer FILE --steer-layer N --steer-scale X)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise ConfigError("serving needs FastAPI and uvicorn, the optional serve extra: "
                          "pip install -e '.[serve]'") from exc
    from model.serve.app import DEFAULT_MAX_TOKENS, create_app

    err = err or sys.stderr
    if not 0 <= port <= 65535:
        raise SamplingError(f"--port must be between 0 and 65535, got {port}")
    use_threads(threads)
    if max_tokens is not None and max_tokens < 1:
        raise SamplingError(f"--max-tokens must be >= 1, got {max_tokens}")
    check_steering(steer, steer_layer, steer_scale)
    dev = pick_device(device, setting="--device")  # before the bind: a bad name fails at once
    warning = bind_warning(host)
    if warning:
        print(warning, file=err)
    sock = listen(host, port)  # before the (slow) load: a busy port fails at once
    try:
        loaded = load_named_model(name, dev, dtype=dtype, pack=pack, quantize=quantize,
                                  err=err)
        steering = load_steering_option(steer, loaded.model, steer_layer, steer_scale, err)
        app = create_app(loaded, name, max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
                         steering=steering)
        port = sock.getsockname()[1]  # the one the OS chose, for --port 0
        shown = f"[{host}]" if ":" in host else host
        print(f"playground: http://{shown}:{port}/   API: http://{shown}:{port}/v1 "
              f"(model {app.state.served.model_id!r}); Ctrl-C stops", file=err)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACE_S)
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after shutting down
        pass
    finally:
        sock.close()
    print("server stopped", file=err)
    return 0


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, opened here so that a busy port or a bad address is one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}; pick another --port or "
                          "--host") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a model: the web playground and an "
                                            "OpenAI-compatible API.")
    p.add_argument("--checkpoint", metavar="NAME",
                   help="a run or checkpoint dir, gpt2[-medium|-large|-xl], or a Hugging Face "
                        "GPT-2 dir (default: the newest checkpoint under out/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for the model")
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help="the most new tokens one request may ask for (default 1024)")
    add_kernel_arguments(p)
    add_steering_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args.checkpoint, host=args.host, port=args.port,
                               device=args.device, dtype=args.dtype, threads=args.threads,
                               max_tokens=args.max_tokens, pack=not args.no_pack,
                               quantize=args.quantize,
                               steer=args.steer, steer_layer=args.steer_layer,
                               steer_scale=args.steer_scale))
