"""Peak memory of loading a GPT-2-shaped Hugging Face directory, against the size of its weights.

    python bench/load_memory.py --shape gpt2-xl          # 1.56B parameters, 6.2 GB of float32
    python bench/load_memory.py --shape gpt2 --dir some/hf/dir   # an existing directory instead
    python bench/load_memory.py --shape gpt2-xl --sample float32 auto   # sample.py, per dtype

The directory is written by `transformers` from a randomly initialised GPT2LMHeadModel of the
shape's sizes (real 50257 vocabulary, 1024 positions), in a temporary folder that is deleted at
the end; nothing is downloaded. Loading then runs in a fresh process through model.weights.loading
(as `sample.py --checkpoint DIR` does), which reports its own peak RSS (getrusage). The figure
to look at is peak RSS over the weights' size: about 1 means the weights are held once.

--sample DTYPE... instead runs the whole `python sample.py --checkpoint DIR --dtype DTYPE` (10
new tokens) once per dtype and reports each process's peak RSS (from wait4) and wall time:
what sampling the model costs in float32 and in what `auto` picks (bfloat16 weights on a CPU
that computes it natively).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine_line, scratch_dir

SHAPES = {  # n_layer, n_head, n_embd of OpenAI's four GPT-2 sizes
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}

WRITE = """
import sys, torch, transformers
n_layer, n_head, n_embd = map(int, sys.argv[2:5])
torch.manual_seed(0)
config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
# One file, as on the hub (openai-community/gpt2-xl has a single model.safetensors).
transformers.GPT2LMHeadModel(config).save_pretrained(sys.argv[1], max_shard_size="100GB")
"""

LOAD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
import torch
from model.weights.loading import load_model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
loaded = load_model(sys.argv[1])
seconds = time.perf_counter() - start
params = sum(p.numel() for p in loaded.model.parameters())
weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**20
print(json.dumps({"params": params, "weights_mib": weights, "seconds": seconds,
                  "import_rss_mib": base,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def sample_peak(directory: Path, dtype: str, tokens: int = 10) -> None:
    """Peak RSS and wall time of one whole sample.py process on `directory` in `dtype`."""
    command = [sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(directory),
               "--prompt", "Hello", "--max-new-tokens", str(tokens), "--seed", "1",
               "--dtype", dtype]
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not all children's
        seconds = time.perf_counter() - start
        err.seek(0)
        text = err.read()
    if status:
        raise SystemExit(f"error: sample.py failed:\n{text[-2000:]}")
    chosen = re.search(r"in (dtype \w+ \(.*\))$", text, re.M)
    print(f"sample.py --dtype {dtype}, {tokens} tokens: peak RSS {usage.ru_maxrss / 1024:,.0f} "
          f"MiB, {seconds:.1f} s whole process; {chosen.group(1) if chosen else '?'}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-xl")
    parser.add_argument("--dir", default=None, help="an existing HF GPT-2 directory to load")
    parser.add_argument("--tmp", default=None, help="where the generated directory goes")
    parser.add_argument("--sample", nargs="+", metavar="DTYPE",
                        help="peak RSS of sample.py in each of these dtypes (float32, auto, "
                             "bfloat16) instead of loading alone")
    args = parser.parse_args()
    print(machine_line())

    with scratch_dir("smallgpt-load-", args.tmp) as tmp:
        directory = Path(args.dir) if args.dir else Path(tmp) / args.shape
        if not args.dir:
            print(f"writing a random {args.shape}-shaped directory with transformers ...",
                  flush=True)
            subprocess.run([sys.executable, "-c", WRITE, str(directory),
                            *map(str, SHAPES[args.shape])], check=True)
        files = {p.name: p.stat().st_size / 2**20 for p in directory.iterdir() if p.is_file()}
        print("files: " + ", ".join(f"{n} {s:,.0f} MiB" for n, s in sorted(files.items())))
        if args.sample:
            for dtype in args.sample:
                sample_peak(directory, dtype)
            return
        out = subprocess.run([sys.executable, "-c", LOAD, str(directory), str(ROOT)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
    print(f"loaded {r['params']:,} parameters ({r['weights_mib']:,.0f} MiB of weights) in "
          f"{r['seconds']:.1f} s")
    print(f"peak RSS {r['peak_rss_mib']:,.0f} MiB (after importing torch: "
          f"{r['import_rss_mib']:,.0f} MiB); peak / weights = "
          f"{r['peak_rss_mib'] / r['weights_mib']:.2f}, "
          f"(peak - import) / weights = "
          f"{(r['peak_rss_mib'] - r['import_rss_mib']) / r['weights_mib']:.2f}")


if __name__ == "__main__":
    main()
