"""Shared by the server tests: a tiny trained checkpoint and a real server on a free port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from model.config import config_from_dict
from model.inference.sampling import Step, generate
from model.training.loop import train
from model.weights.loading import Pretrained, load_model

WORDS = ["to", "be", "or", "not", "the", "question", "whether", "nobler", "mind", "suffer"]


def train_tiny(tmp: Path, block_size: int = 32) -> Path:
    """A few steps of a 2-layer char model on varied text: a real checkpoint in seconds. Some
    lines are dialogue in the chat template's shape, so the vocabulary has its role headers
    (and no capitals besides theirs: "ROMEO" stays outside it)."""
    corpus = tmp / "corpus.txt"
    lines = [" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 5)) + "."
             for i in range(1500)]
    for i in range(0, len(lines), 10):
        lines[i] = f"System: be brief.\n\nUser: {lines[i]}\n\nAssistant: {lines[i + 1]}"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = config_from_dict({
        "model": dict(block_size=block_size, n_layer=2, n_head=2, n_embd=32),
        "data": dict(source=str(corpus), tokenizer="char", cache_dir=str(tmp / "cache"),
                     num_proc=1),
        "train": dict(out_dir=str(tmp / "run"), max_steps=30, batch_size=8, lr=1e-2,
                      min_lr=1e-3, warmup_steps=2, eval_interval=30, eval_steps=1,
                      log_interval=10, seed=7, device="cpu", threads=1),
    })
    train(cfg)
    return tmp / "run"


@contextmanager
def running_server(pretrained: Pretrained, name: str | None = None,
                   **limits) -> Iterator[tuple[str, object]]:
    """The app on 127.0.0.1 and a free port, served by uvicorn on a thread: (base URL, app)."""
    import uvicorn

    from model.serve import create_app

    app = create_app(pretrained, name, **limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn takes the bound socket
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def load(run_dir: Path) -> Pretrained:
    return load_model(str(run_dir), "cpu")


def failing_generate(after: int, error: Exception) -> Callable[..., Iterator[Step]]:
    """`generate` that raises `error` after `after` steps: a failure in the middle of a stream,
    once its 200 has gone out (monkeypatch it over a server module's `generate`)."""
    def broken(*args, **kwargs) -> Iterator[Step]:
        for i, step in enumerate(generate(*args, **kwargs)):
            if i == after:
                raise error
            yield step
    return broken
