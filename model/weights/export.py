"""Export a model for other runtimes (the command line, `python -m model.export
RUN_OR_CHECKPOINT OUT_DIR [--format gguf]`, is model/cli/export.py).

    hf    a Hugging Face directory: config.json, model.safetensors, generation_config.json and
          the tokenizer files, so that `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`
          and `AutoTokenizer.from_pretrained(OUT_DIR)` load it with no smallgpt code, and it
          loads back into smallgpt by name like any Hugging Face directory. The architecture is
          the transformers one that computes exactly our function (model/weights/hf.py).
    gguf  one .gguf file for llama.cpp and Ollama, in the llama.cpp architecture that computes
          exactly our function (model/weights/gguf.py), and an Ollama Modelfile beside it.

A model no architecture computes is refused with every blocking setting named. A chat-trained
run carries its chat template in either form.

    from model.weights.export import export
    result = export("out/small", "exported/small")   # result.architecture: ApertusForCausalLM
    result = export("out/small", "exported/small-gguf", "gguf")   # small-f16.gguf, Modelfile
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.errors import CheckpointError, ConfigError
from model.files import staged_directory
from model.weights.chat_template import jinja_chat_template, ollama_template
from model.weights.hf import ARCHITECTURES, save_hf
from model.weights.loading import Pretrained, load_model

FORMATS = ("hf", "gguf")


@dataclass
class Exported:
    """What `export` wrote."""

    directory: Path
    model_type: str  # hf: config.json's model_type; gguf: the llama.cpp architecture
    architecture: str  # hf: the transformers class, e.g. ApertusForCausalLM; gguf: as model_type
    tokenizer: str  # our tokenizer's name: gpt2, char or bpe
    vocab_size: int
    files: list[str]
    format: str = "hf"
    outtype: str | None = None  # gguf: the matrices' type, f32, f16, bf16 or q8_0
    chat_template: bool = False  # whether a chat template was written


def export(name: str, out_dir: str | Path, format: str = "hf",
           outtype: str | None = None) -> Exported:
    """Load the model called `name` (a run, a checkpoint, a Hugging Face directory, gpt2*) and
    write it with its tokenizer to `out_dir`, which must be new or empty: a Hugging Face
    directory (`format` "hf") or a GGUF file and an Ollama Modelfile ("gguf", the matrices in
    `outtype`, by default model.weights.gguf.DEFAULT_OUTTYPE).

    The files are written to a temporary directory beside `out_dir` and moved into place at
    the end: an export that fails, or is refused, writes no file and never touches existing
    ones.
    """
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {', '.join(FORMATS)}")
    if outtype is not None and format != "gguf":
        raise ConfigError(f"--outtype {outtype} applies to --format gguf only; a Hugging Face "
                          "export keeps the checkpoint's dtype")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{str(out)!r} is a file; name a new directory to export to")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{str(out)!r} already exists and is not empty; choose a new "
                              "directory, or remove it first")
    if format == "gguf":
        try:  # the gguf package is needed for this format only
            from model.weights import gguf
        except ImportError as exc:
            raise ConfigError(f"--format gguf needs the gguf package ({exc}); pip install "
                              "gguf") from exc

        outtype = outtype or gguf.DEFAULT_OUTTYPE
        if outtype not in gguf.OUTTYPES:  # before the model is loaded
            raise ConfigError(f"outtype {outtype!r} is not one of {', '.join(gguf.OUTTYPES)}")
    loaded = load_model(name, "cpu")
    chat = jinja_chat_template() if loaded.chat_trained else None
    with staged_directory(out) as staging:
        if format == "hf":
            model_type = save_hf(loaded.model, staging, loaded.tokenizer, chat_template=chat)
            architecture = ARCHITECTURES[model_type]
        else:
            model_type = architecture = _save_gguf_dir(loaded, model_name(name, loaded), staging,
                                                        outtype, chat)
    return Exported(out, model_type, architecture, loaded.tokenizer.name,
                    loaded.tokenizer.vocab_size, sorted(p.name for p in out.iterdir()), format,
                    outtype, chat is not None)


def model_name(name: str, loaded: Pretrained) -> str:
    """A short name for the files: a run's config name, else the last part of `name` (a
    directory or a hub name such as gpt2)."""
    if loaded.config is not None and loaded.config.name != "run":
        return loaded.config.name
    return Path(name).name or "model"


def _save_gguf_dir(loaded: Pretrained, name: str, directory: Path, outtype: str,
                   chat_template: str | None) -> str:
    from model.weights.gguf import save_gguf

    file_name = f"{name}-{outtype}.gguf"
    family = save_gguf(loaded.model, directory / file_name, loaded.tokenizer, outtype,
                       name=name, chat_template=chat_template)
    (directory / "Modelfile").write_text(
        ollama_modelfile(file_name, loaded.model.config.block_size, chat_template is not None),
        encoding="utf-8")
    return family


def ollama_modelfile(gguf_file: str, context: int, chat: bool) -> str:
    """An Ollama Modelfile for the GGUF file beside it: `ollama create NAME -f Modelfile`.

    The context is the model's own (positions past it were never trained, and a GPT-2 has no
    embedding for them); a chat-trained model gets our chat template, any other one takes the
    prompt as it is, as sample.py does. End-of-text, the GGUF's eos token, ends generation.
    """
    template = ollama_template() if chat else "{{ .Prompt }}"
    return (f"# Ollama: ollama create NAME -f Modelfile, then ollama run NAME\n"
            f"FROM ./{gguf_file}\n"
            f'TEMPLATE """{template}"""\n'
            f"PARAMETER num_ctx {context}\n")
