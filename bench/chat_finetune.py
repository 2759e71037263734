"""Time per step and peak memory of chat fine-tuning a GPT-2-124M-shaped model.

    python bench/chat_finetune.py [--steps 8] [key=value ...]

A randomly initialised GPT2LMHeadModel of GPT-2's shape (124M parameters, the real 50257
vocabulary) is written by `transformers` into a temporary directory (nothing is downloaded;
OpenAI's weights would time the same), then configs/chat_gpt2.yaml trains from it on the
offline demo set in a fresh process through model.training.train, as
`python train.py --config chat_gpt2.yaml train.init_from=DIR` would. Reported: the median
seconds per optimizer step after the first, reply tokens per step, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import ROOT, machine_line, scratch_dir

WRITE = """
import sys, torch, transformers
torch.manual_seed(0)
transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(sys.argv[1])
"""

TRAIN = """
import json, resource, statistics, sys
sys.path.insert(0, sys.argv[1])
from model.config import load_config
from model.training.loop import train
cfg = load_config("chat_gpt2.yaml", sys.argv[2:])
result = train(cfg)
print(json.dumps({"steps": result.steps, "step_seconds": result.step_seconds,
                  "median_s": statistics.median(result.step_seconds[1:]),
                  "val_loss": result.val_loss,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tmp", default=None, help="where the generated directory goes")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(machine_line())
    with scratch_dir("smallgpt-chat-", args.tmp) as tmp:
        directory = Path(tmp) / "gpt2-shaped"
        subprocess.run([sys.executable, "-c", WRITE, str(directory)], check=True)
        overrides = [f"train.init_from={directory}", f"train.out_dir={Path(tmp) / 'run'}",
                     f"train.max_steps={args.steps}", f"train.eval_interval={args.steps}",
                     "train.eval_steps=1", f"data.cache_dir={Path(tmp) / 'data'}",
                     *args.overrides]
        out = subprocess.run([sys.executable, "-c", TRAIN, str(ROOT), *overrides], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
    print("python bench/chat_finetune.py " + " ".join(sys.argv[1:]))
    print(f"chat fine-tuning, GPT-2 124M shape, configs/chat_gpt2.yaml + {' '.join(overrides[2:])}")
    print(f"{r['steps']} steps: median {r['median_s']:.2f} s/step after the first "
          f"(all: {', '.join(f'{s:.2f}' for s in r['step_seconds'])}); "
          f"peak RSS {r['peak_rss_mib']:,.0f} MiB")


if __name__ == "__main__":
    main()
