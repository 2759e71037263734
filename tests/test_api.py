"""The public API in model/__init__.py: every name importable, and `import model` doing no work."""

import subprocess
import sys
from pathlib import Path

import pytest

import model

ROOT = Path(__file__).resolve().parent.parent


def test_research_imports():
    from model import (  # noqa: F401
        GPT,
        GPTConfig,
        Tokenizer,
        generate,
        load_checkpoint,
        load_config,
        prepare_data,
        train,
    )
    from model.weights.loading import load_checkpoint as defined

    assert load_checkpoint is defined
    assert train.__module__ == "model.training.loop"
    assert generate.__module__ == "model.inference.sampling"
    assert GPTConfig.__module__ == "model.gpt" and issubclass(GPT, model.gpt.nn.Module)


@pytest.mark.parametrize("name", model.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(model, name).__name__ == name
    assert name in dir(model)


def test_unknown_names_and_submodules():
    with pytest.raises(AttributeError, match="no_such_thing"):
        model.no_such_thing  # noqa: B018
    from model.data import tokenizer  # a submodule, not an export

    assert tokenizer.Tokenizer is model.Tokenizer
    assert "format_tally" not in model.__all__


def test_import_does_no_work():
    code = ("import sys, model; "
            "heavy = [m for m in ('torch', 'model.training.loop', 'model.gpt', 'model.config', "
            "'model.inference.sampling') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
