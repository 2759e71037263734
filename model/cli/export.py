"""Front: `python -m model.export RUN_OR_CHECKPOINT OUT_DIR` writes a Hugging Face directory."""

from __future__ import annotations

import argparse

from model.cli.common import run_cli
from model.weights.export import export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.export",
        description="Write a smallgpt model and its tokenizer as a Hugging Face directory "
                    "(transformers' AutoModelForCausalLM and AutoTokenizer load it).")
    parser.add_argument("model", help="a run directory, a checkpoint, a Hugging Face "
                                      "directory, or gpt2 / gpt2-medium / ...")
    parser.add_argument("out_dir", help="the directory to write (new or empty)")
    args = parser.parse_args(argv)

    def run() -> None:
        result = export(args.model, args.out_dir)
        print(f"wrote {result.directory}: {result.architecture} (model_type "
              f"{result.model_type}), {result.tokenizer} tokenizer of {result.vocab_size} "
              f"tokens; files: {', '.join(result.files)}")
        print(f"load it with transformers: AutoModelForCausalLM.from_pretrained("
              f"{str(result.directory)!r}) and AutoTokenizer.from_pretrained(...)")

    return run_cli(run)
