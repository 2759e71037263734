"""`python -m model.explore`: every command end to end on a tiny trained checkpoint, JSON output,
model names (the newest under out/, Hugging Face GPT-2 directories), and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.cli.explore import main
from model.config import Config, GPTConfig
from model.gpt import GPT
from model.weights.hf import save_hf

# -- end to end on a tiny trained checkpoint ---------------------------------------------------
TEXT = "the cat sat on the mat. the dog sat on the log. the cats and the dogs sat. " * 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from model.data.tokenizer import train_tokenizer
    from model.weights.checkpoint import save_checkpoint

    torch.manual_seed(0)
    tok = train_tokenizer("char", [TEXT])
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_embd=32, n_head=4, n_layer=2, block_size=32)
    model = GPT(cfg)
    data = torch.tensor(tok.encode(TEXT))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        starts = torch.randint(0, len(data) - 33, (8,))
        x = torch.stack([data[s:s + 32] for s in starts])
        y = torch.stack([data[s + 1:s + 33] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("explore") / "run"
    save_checkpoint(run / "latest", model, Config(model=cfg, name="t"), tok.spec())
    return run


def explore(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr, less stderr's first line when it names the model loaded
    (checked on its own in test_the_model_loaded_is_named)."""
    code = main(list(argv))
    captured = capsys.readouterr()
    err = captured.err
    if err.startswith("using "):
        err = err.partition("\n")[2]
    return code, captured.out, err


def test_every_command_end_to_end(run_dir, capsys):
    ck = ["--checkpoint", str(run_dir)]
    code, out, _ = explore(capsys, "neighbors", "cat", "-k", "3", *ck)
    assert code == 0 and "3 tokens" in out and "mean" in out and "cosine" in out
    code, out, _ = explore(capsys, "analogy", "d", "o", "c", *ck)
    assert code == 0 and "'d' - 'o' + 'c'" in out
    code, out, _ = explore(capsys, "direction", "s", "t", "--words", "a c d", *ck)
    assert code == 0 and out.count("\n") == 5
    code, out, _ = explore(capsys, "params", *ck)
    assert code == 0 and "token embedding (W_E)" in out and "total" in out
    png = run_dir / "n.png"
    code, out, _ = explore(capsys, "next", "the ca", "--temperatures", "0.5", "2", "--out",
                           str(png), *ck)
    assert code == 0 and "p@T=0.5" in out and "p@T=2" in out and str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = explore(capsys, "attention", "the cat", "--layer", "0", "--head", "3", *ck)
    assert code == 0 and "layer 0, head 3" in out
    assert (run_dir / "attention.png").read_bytes()[:4] == b"\x89PNG"  # default: the run dir
    code, out, _ = explore(capsys, "lens", "the c", "-k", "2", *ck)
    assert code == 0 and "embeddings" in out and "block 1" in out


def test_json_output(run_dir, capsys):
    ck = ["--checkpoint", str(run_dir), "--json"]
    code, out, _ = explore(capsys, "neighbors", "cat", "-k", "2", *ck)
    data = json.loads(out)
    assert code == 0 and data["query"]["multi_token"] and data["query"]["pieces"] == ["c", "a", "t"]
    assert len(data["neighbors"]) == 2 and -1 <= data["neighbors"][0]["score"] <= 1
    code, out, _ = explore(capsys, "next", "the", "-k", "3", "--out", str(run_dir / "j.png"), *ck)
    data = json.loads(out)
    assert len(data["top"]) == 3 and len(data["probs"]) == 3 and data["png"].endswith("j.png")
    code, out, _ = explore(capsys, "lens", "the", *ck)
    assert len(json.loads(out)["top"]) == 3  # embeddings + 2 blocks
    code, out, _ = explore(capsys, "attention", "the", "--out", str(run_dir / "a.png"), *ck)
    assert json.loads(out)["layer"] == 1  # default: the last layer


def test_params_preset_gpt3_needs_no_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no out/ here
    code, out, _ = explore(capsys, "params", "--preset", "gpt3", "--json")
    data = json.loads(out)
    assert code == 0 and 174e9 < data["total"] < 176e9
    emb = next(r for r in data["rows"] if r["component"].startswith("token embedding"))
    assert emb["count"] == 50257 * 12288 == 617_558_016


def test_default_checkpoint_is_the_newest_under_out(run_dir, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(run_dir / "latest", tmp_path / "out" / "t" / "latest")
    monkeypatch.chdir(tmp_path)
    code = main(["neighbors", "a", "-k", "1"])
    err = capsys.readouterr().err
    assert code == 0 and "using the newest checkpoint" in err
    assert str(Path("out/t/latest")) in err and err.count("\n") == 1
    code, _, err = explore(capsys, "neighbors", "a", "--checkpoint", "missing")
    assert code == 2 and "missing" in err


@pytest.mark.parametrize("argv, message", [
    (["neighbors", "Zebra"], "word 'Zebra': text has 3 characters"),
    (["direction", "s", "t", "--words", " "], "empty"),
    (["attention", "the", "--layer", "2"], "layers 0 to 1"),
    (["attention", "the", "--head", "-1"], "heads 0 to 3"),
    (["lens", "the cat sat on the mat. the dog sat"], "context size"),
    (["next", "the", "--temperatures", "0"], "temperatures"),
])
def test_bad_input_is_a_one_line_error(run_dir, capsys, argv, message):
    code, out, err = explore(capsys, *argv, "--checkpoint", str(run_dir))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_hf_gpt2_weights_are_explored_with_the_gpt2_tokenizer(tmp_path, monkeypatch, capsys):
    from model.data.tokenizer import train_tokenizer
    from model.weights import hf_tokenizer

    char = train_tokenizer("char", [TEXT])
    asked = []

    def fake_gpt2():  # tiktoken's gpt2 files need a download; any tokenizer fits the wiring
        asked.append({"name": "gpt2"})
        return char

    monkeypatch.setattr(hf_tokenizer, "GPT2Tokenizer", fake_gpt2)
    torch.manual_seed(0)
    save_hf(GPT(GPTConfig(vocab_size=char.vocab_size, n_embd=16, n_head=2, n_layer=1,
                          block_size=16, activation="gelu_tanh")), tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    code, out, _ = explore(capsys, "lens", "the", "--hf-gpt2", str(tmp_path / "hf"))
    assert code == 0 and "block 0" in out and asked == [{"name": "gpt2"}]
    code, out, _ = explore(capsys, "attention", "the", "--hf-gpt2", str(tmp_path / "hf"))
    assert code == 0 and (tmp_path / "attention.png").exists()  # no run dir: the cwd


def test_the_model_loaded_is_named(run_dir, capsys):
    assert main(["neighbors", "a", "-k", "1", "--checkpoint", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"using smallgpt checkpoint {run_dir / 'latest'} (step")
    assert err.count("\n") == 1


def test_hf_gpt2_is_an_alias_of_checkpoint(run_dir, capsys):
    from model.cli.explore import build_parser

    args = build_parser().parse_args(["lens", "x", "--hf-gpt2", "some/dir"])
    assert args.checkpoint == "some/dir"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lens", "x", "--hf-gpt2", "a", "--checkpoint", "b"])
    assert "not allowed with" in capsys.readouterr().err
