"""What a user gets, as one JSON file: per-step float32 losses of several recipes, greedy
sample.py text and the server's seeded responses. Run it on two commits and diff the files: a
refactor that changes nothing a user sees gives identical files.

    python bench/behaviour_digest.py --out /tmp/before.json      # on the old commit
    python bench/behaviour_digest.py --out /tmp/after.json       # on the new one
    diff /tmp/before.json /tmp/after.json

Runs in a fresh temporary directory (its own out/ and data caches), float32, one thread, so the
numbers depend on the code alone. Losses are written with float.hex: equal means bit for bit.
Uses only the public API (model's top-level names, model.serve.create_app, sample.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, overrides: list[str], config: str = "tiny.yaml") -> dict:
    from model import load_config, train

    common = ["train.dtype=float32", "train.threads=1", f"train.out_dir=out/{name}"]
    result = train(load_config(config, [*common, *overrides]))
    return {"losses": [float(x).hex() for x in result.losses],
            "val_loss": None if result.val_loss is None else float(result.val_loss).hex(),
            "steps": result.steps}


def sample_text(checkpoint: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--checkpoint", checkpoint, "--temperature",
         "0", "--max-new-tokens", "40", "--prompt", "ROMEO:", "--threads", "1",
         "--dtype", "float32"], capture_output=True, text=True, check=True)
    return done.stdout


def server_responses(checkpoint: str) -> list:
    from fastapi.testclient import TestClient

    from model import load_model
    from model.serve import create_app

    loaded = load_model(checkpoint)
    out = []
    with TestClient(create_app(loaded, "digest")) as client:
        for path, body in [
            ("/v1/completions", {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0.8,
                                 "seed": 7, "n": 2, "logprobs": 2}),
            ("/v1/completions", {"prompt": ["To be", "KING:"], "max_tokens": 12,
                                 "temperature": 0}),
            ("/v1/completions", {"prompt": "ROMEO: But soft", "echo": True, "logprobs": 1,
                                 "max_tokens": 0}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Who?"}],
                                      "max_tokens": 15, "temperature": 0.7, "seed": 3,
                                      "logprobs": True, "top_logprobs": 2}),
            ("/api/distribution", {"tokens": [1, 2, 3], "temperatures": [0, 0.5, 1], "k": 5}),
        ]:
            reply = client.post(path, json=body).json()
            for key in ("id", "created"):
                reply.pop(key, None)
            out.append([path, reply])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args()
    out_file = Path(args.out).resolve()
    os.environ["SMALLGPT_CPU_BF16"] = "0"
    import torch

    torch.set_num_threads(1)
    digest: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        digest["small_50"] = run("small", ["train.max_steps=50", "train.eval_interval=25"],
                                 "small.yaml")
        digest["tiny"] = run("tiny", [])
        digest["finetune"] = run("finetune", ["train.init_from=out/tiny", "train.max_steps=20"])
        digest["chat_small"] = run("chat", ["train.init_from=out/small", "train.max_steps=20",
                                            "train.eval_interval=10", "train.batch_size=4"],
                                   "chat_small.yaml")
        digest["lora"] = run("lora", ["train.init_from=out/small", "train.lora_rank=4",
                                      "train.max_steps=20", "train.eval_interval=10"],
                             "small.yaml")
        digest["muon"] = run("muon", ["train.optimizer=muon", "train.max_steps=20"])
        dropout = ["model.dropout=0.1", "train.max_steps=20", "train.eval_interval=10"]
        digest["dropout_whole"] = run("drop_whole", dropout)
        first = run("drop_resume", [*dropout[:1], "train.max_steps=10", "train.eval_interval=10"])
        rest = run("drop_resume", [*dropout, "train.resume=true"])
        digest["dropout_resumed"] = {"first": first, "rest": rest}
        digest["sample_small"] = sample_text("out/small")
        digest["sample_tiny"] = sample_text("out/tiny")
        digest["server"] = server_responses("out/small")
    out_file.write_text(json.dumps(digest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
