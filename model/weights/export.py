"""Export a model to the Hugging Face layout (the command line, `python -m model.export
RUN_OR_CHECKPOINT OUT_DIR`, is model/cli/export.py).

The directory holds config.json, model.safetensors, generation_config.json and the tokenizer
files, so that `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` and
`AutoTokenizer.from_pretrained(OUT_DIR)` load it with no smallgpt code, and it loads back into
smallgpt by name like any Hugging Face directory. The architecture is the transformers one
that computes exactly our function (model/weights/hf.py: GPT-2, or Llama, Qwen3, Arcee or
Apertus for rotary models); a model none computes is refused with every blocking setting named.

    from model.weights.export import export
    result = export("out/small", "exported/small")   # result.architecture: ApertusForCausalLM
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.errors import CheckpointError
from model.files import staged_directory
from model.weights.hf import ARCHITECTURES, save_hf
from model.weights.loading import load_model


@dataclass
class Exported:
    """What `export` wrote."""

    directory: Path
    model_type: str  # config.json's model_type: gpt2, llama, qwen3, arcee or apertus
    architecture: str  # the transformers class, e.g. ApertusForCausalLM
    tokenizer: str  # our tokenizer's name: gpt2, char or bpe
    vocab_size: int
    files: list[str]


def export(name: str, out_dir: str | Path) -> Exported:
    """Load the model called `name` (a run, a checkpoint, a Hugging Face directory, gpt2*) and
    write it with its tokenizer to `out_dir`, which must be new or empty.

    The files are written to a temporary directory beside `out_dir` and moved into place at
    the end: an export that fails, or is refused, writes no file and never touches existing
    ones.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{str(out)!r} is a file; name a new directory to export to")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{str(out)!r} already exists and is not empty; choose a new "
                              "directory, or remove it first")
    loaded = load_model(name, "cpu")
    with staged_directory(out) as staging:
        model_type = save_hf(loaded.model, staging, loaded.tokenizer)
    return Exported(out, model_type, ARCHITECTURES[model_type], loaded.tokenizer.name,
                    loaded.tokenizer.vocab_size, sorted(p.name for p in out.iterdir()))
