"""Front: `python -m model.export RUN_OR_CHECKPOINT OUT_DIR [--format gguf [--outtype TYPE]]`
writes a Hugging Face directory, or a GGUF file and an Ollama Modelfile."""

from __future__ import annotations

import argparse

from model.cli.common import run_cli
from model.weights.export import FORMATS, export

# The GGUF types, listed here so that --help needs no import of the gguf package.
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.export",
        description="Write a smallgpt model and its tokenizer as a Hugging Face directory "
                    "(transformers' AutoModelForCausalLM and AutoTokenizer load it), or as a "
                    "GGUF file for llama.cpp and Ollama.")
    parser.add_argument("model", help="a run directory, a checkpoint, a Hugging Face "
                                      "directory, or gpt2 / gpt2-medium / ...")
    parser.add_argument("out_dir", help="the directory to write (new or empty)")
    parser.add_argument("--format", choices=FORMATS, default="hf",
                        help="hf: a transformers directory (default); gguf: one .gguf file "
                             "for llama.cpp and Ollama, and an Ollama Modelfile")
    parser.add_argument("--outtype", choices=OUTTYPES, default=None,
                        help="gguf only: the type of the weight matrices (default f16; norms "
                             "and biases stay f32)")
    args = parser.parse_args(argv)

    def run() -> None:
        result = export(args.model, args.out_dir, args.format, args.outtype)
        chat = ", with its chat template" if result.chat_template else ""
        if result.format == "gguf":
            print(f"wrote {result.directory}: llama.cpp architecture {result.architecture}, "
                  f"{result.outtype} weights, {result.tokenizer} tokenizer of "
                  f"{result.vocab_size} tokens{chat}; files: {', '.join(result.files)}")
            gguf_file = next(f for f in result.files if f.endswith(".gguf"))
            print(f"run it: ollama create NAME -f {result.directory / 'Modelfile'}, or "
                  f"llama-cli -m {result.directory / gguf_file}")
            return
        print(f"wrote {result.directory}: {result.architecture} (model_type "
              f"{result.model_type}), {result.tokenizer} tokenizer of {result.vocab_size} "
              f"tokens{chat}; files: {', '.join(result.files)}")
        print(f"load it with transformers: AutoModelForCausalLM.from_pretrained("
              f"{str(result.directory)!r}) and AutoTokenizer.from_pretrained(...)")

    return run_cli(run)
