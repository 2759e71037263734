"""sample.py, called in-process on a tiny saved checkpoint (and twice as a real subprocess):
every option, reproducibility, and a one-line error for every bad input."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import GPT, Config, GPTConfig
from model.data.tokenizer import train_tokenizer
from model.inference.sampling import generate
from model.weights.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model.cli import sample  # noqa: E402

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET: Ay me.\n\n"
BLOCK = 16


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory out/t with a tiny char-level model: (work dir, run dir, model, tokenizer)."""
    work = tmp_path_factory.mktemp("work")
    tokenizer = train_tokenizer("char", [TEXT])
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=1, n_head=2,
                       n_embd=16)
    model = GPT(config)
    with torch.no_grad():  # large weights: varied, context-dependent predictions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    run = work / "out" / "t"
    save_checkpoint(run / "latest", model, Config(model=config, name="t"), tokenizer.spec())
    return work, run, model.eval(), tokenizer


@pytest.fixture
def cli(saved, monkeypatch, capsys):
    """Run sample.py's main in `work` with --checkpoint; returns (exit code, stdout, stderr)."""
    work, run, _, _ = saved
    monkeypatch.chdir(work)

    def call(*args: str, checkpoint: bool = True, stdin: str = "",
             keep_loading_line: bool = False) -> tuple[int, str, str]:
        """stderr's first line names the model loaded; it is left out unless asked for
        (test_the_model_loaded_is_named checks it), so the other tests see what they test."""
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        argv = (["--checkpoint", str(run)] if checkpoint else []) + list(args)
        code = sample.cli(argv)
        out, err = capsys.readouterr()
        if err.startswith("using ") and not keep_loading_line:
            err = err.partition("\n")[2]
        return code, out, err

    return call


def library_text(saved, prompt: str, **kwargs) -> str:
    _, _, model, tokenizer = saved
    return "".join(s.delta for s in generate(model, tokenizer, prompt, **kwargs))


# -- output ------------------------------------------------------------------------------------

def test_prints_prompt_and_continuation_like_the_library(cli, saved):
    code, out, err = cli("--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "3",
                         "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9")
    expected = library_text(saved, "ROMEO:", max_new_tokens=30, seed=3, temperature=0.8,
                            top_k=5, top_p=0.9)
    assert code == 0 and err == ""
    assert out == "ROMEO:" + expected + "\n"


def test_same_seed_same_text_other_seed_other_text(cli):
    run = lambda seed: cli("--prompt", "But", "--max-new-tokens", "40", "--seed", seed,
                           "--temperature", "1.5")[1]
    assert run("1") == run("1")
    assert run("1") != run("2")


def test_temperature_zero_is_greedy(cli, saved):
    _, _, model, tokenizer = saved
    idx = tokenizer.encode("JULIET:")
    with torch.no_grad():
        for _ in range(8):
            idx.append(model(torch.tensor([idx]))[0][0, -1].argmax().item())
    new = idx[len("JULIET:"):]
    new = new[:new.index(tokenizer.eot_id)] if tokenizer.eot_id in new else new
    code, out, _ = cli("--prompt", "JULIET:", "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0 and out == "JULIET:" + tokenizer.decode(new) + "\n"


def test_streams_token_by_token(cli, saved, monkeypatch):
    writes = []
    real = sample.Printer.write
    monkeypatch.setattr(sample.Printer, "write", lambda self, text: (writes.append(text),
                                                                     real(self, text)))
    cli("--prompt", "But", "--max-new-tokens", "12", "--seed", "0")
    text = library_text(saved, "But", max_new_tokens=12, seed=0, temperature=0.8)
    assert [w for w in writes if w] == ["But", *text, "\n"]  # one write per (char) token


def test_stop_string_ends_the_text(cli, saved):
    full = library_text(saved, "ROMEO:", max_new_tokens=30, temperature=0)
    stop = full[3:5]  # a string the greedy text is known to contain
    code, out, _ = cli("--prompt", "ROMEO:", "--max-new-tokens", "30", "--temperature", "0",
                       "--stop", "@@", "--stop", stop)
    assert code == 0 and out == "ROMEO:" + full[:full.index(stop)] + "\n"


def test_num_samples_prints_each_sample(cli):
    code, out, _ = cli("--prompt", "A", "--max-new-tokens", "10", "--num-samples", "3",
                       "--seed", "0", "--temperature", "2")
    samples = out.split("---------------\n")
    assert code == 0 and len(samples) == 4 and samples[3] == ""
    assert all(s.startswith("A") for s in samples[:3]) and len(set(samples[:3])) > 1


def test_show_probs_table(cli, saved):
    code, out, _ = cli("--prompt", "But", "--max-new-tokens", "6", "--show-probs", "3",
                       "--seed", "0")
    _, _, model, tokenizer = saved
    steps = list(generate(model, tokenizer, "But", max_new_tokens=6, seed=0, temperature=0.8))
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["step", "token", "prob", "|", "top", "3"]
    rows = lines[1:1 + len(steps)]
    assert [int(r.split()[0]) for r in rows] == list(range(len(steps)))
    assert lines[1 + len(steps)] == ""
    for row in rows:
        prob = float(row.split("|")[0].split()[-1])
        alternatives = row.split("|")[1].split("  [")[0].split()  # cut the "[length]" tag
        assert 0 < prob <= 1 and len(alternatives) == 6  # three tokens, each with its probability
    assert len({row.index("|") for row in rows}) == 1  # aligned columns
    assert lines[-1] == "But" + "".join(s.delta for s in steps)  # then the whole text


def test_visible_whitespace():
    assert sample.visible(" a\n\tb") == "·a↵→b"
    assert sample.visible("\x00") == "\\x00"
    assert sample.cell("") == "∅" and len(sample.cell("x" * 40)) == sample.TOKEN_WIDTH


def test_json_lines(cli, saved):
    _, _, model, tokenizer = saved
    code, out, _ = cli("--prompt", "But", "--max-new-tokens", "5", "--json", "--show-probs",
                       "4", "--seed", "0")
    records = [json.loads(line) for line in out.splitlines()]
    steps = list(generate(model, tokenizer, "But", max_new_tokens=5, seed=0, temperature=0.8))
    assert code == 0 and [r["token"] for r in records] == [s.token for s in steps]
    for i, r in enumerate(records):
        assert r["index"] == i and r["text"] == tokenizer.token_text(r["token"])
        assert 0 < r["prob"] <= 1 and 1 <= len(r["top"]) <= 4
        assert set(r["top"][0]) == {"token", "text", "prob"}
    assert records[-1]["finished"] in ("length", "eot")


def test_prompt_file_and_stdin(cli, saved, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("JULIET:", encoding="utf-8")
    args = ("--max-new-tokens", "5", "--seed", "4")
    from_file = cli("--prompt-file", str(path), *args)[1]
    from_stdin = cli("--prompt-file", "-", *args, stdin="JULIET:")[1]
    assert from_file == from_stdin == cli("--prompt", "JULIET:", *args)[1]
    assert from_file.startswith("JULIET:")


def test_empty_prompt_starts_from_end_of_text(cli, saved):
    code, out, _ = cli("--max-new-tokens", "6", "--seed", "5")
    assert code == 0
    assert out == library_text(saved, "", max_new_tokens=6, seed=5, temperature=0.8) + "\n"


def test_newest_checkpoint_is_used_and_named(cli, saved):
    code, _, err = cli("--prompt", "B", "--max-new-tokens", "2", checkpoint=False,
                       keep_loading_line=True)
    assert code == 0 and err.startswith("using the newest checkpoint under out/: smallgpt "
                                        f"checkpoint {Path('out/t/latest')} (step")
    assert err.count("\n") == 1


def test_the_model_loaded_is_named(cli, saved):
    _, run, _, _ = saved
    code, _, err = cli("--prompt", "B", "--max-new-tokens", "2", keep_loading_line=True)
    assert code == 0 and err.startswith(f"using smallgpt checkpoint {run / 'latest'} (step")
    assert "parameters)" in err and err.count("\n") == 1


def test_threads_sets_torch_cpu_threads(cli, monkeypatch):
    from model import runtime

    seen = []
    monkeypatch.setattr(runtime, "configure_threads", seen.append)
    assert cli("--prompt", "B", "--max-new-tokens", "1", "--threads", "3")[0] == 0
    assert cli("--prompt", "B", "--max-new-tokens", "1")[0] == 0
    assert seen == [3, runtime.default_threads()]


def test_interactive_appends_each_exchange(cli, monkeypatch):
    prompts, replies = [], []
    real = sample.generate

    def spy(model, tokenizer, prompt, **kwargs):
        steps = list(real(model, tokenizer, prompt, **kwargs))
        prompts.append(prompt)
        replies.append("".join(s.delta for s in steps))
        return iter(steps)

    monkeypatch.setattr(sample, "generate", spy)
    code, out, err = cli("--interactive", "--system", "JULIET:", "--max-new-tokens", "4",
                         "--temperature", "0", stdin="But\nAy me.\nexit\nnever read\n")
    assert code == 0 and len(prompts) == 2
    assert prompts == ["JULIET:\nBut\n", f"JULIET:\nBut\n{replies[0]}\nAy me.\n"]
    assert out == f"{replies[0]}\n{replies[1]}\n"
    assert err.count("> ") == 3  # asked twice, then once more before "exit"


def test_each_interactive_turn_draws_with_the_next_seed(cli, monkeypatch):
    """--seed S: turn i samples with seed S + i, so a session replays, yet turns differ."""
    seeds = []
    real = sample.generate

    def spy(model, tokenizer, prompt, **kwargs):
        seeds.append(kwargs["seed"])
        return real(model, tokenizer, prompt, **kwargs)

    monkeypatch.setattr(sample, "generate", spy)
    assert cli("--interactive", "--seed", "3", "--max-new-tokens", "2",
               stdin="But\nAy me.\nexit\n")[0] == 0
    assert seeds == [3, 4]


def test_conversation_appends_each_exchange():
    chat = sample.Conversation("You are terse.")
    assert chat.prompt("Hi") == "You are terse.\nHi\n"
    chat.add("Hi", "Hello.")
    assert chat.prompt("Bye") == "You are terse.\nHi\nHello.\nBye\n"
    assert sample.Conversation().prompt("Hi") == "Hi\n"


def test_device_dtype_and_compile_options(cli, monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.setdefault("compiled", m))
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, *a, **kw: (
        seen.setdefault("dtype", next(model.parameters()).dtype), real(model, *a, **kw))[1])
    code, out, _ = cli("--prompt", "B", "--max-new-tokens", "3", "--device", "cpu",
                       "--dtype", "bfloat16", "--compile")
    assert code == 0 and out.startswith("B")
    assert seen["dtype"] == torch.bfloat16 and isinstance(seen["compiled"], GPT)


def test_hugging_face_gpt2_directory_is_a_checkpoint_name(saved, tmp_path, monkeypatch, capsys):
    from model.weights import hf_tokenizer
    from model.weights.hf import save_hf

    _, _, _, tokenizer = saved
    # No tokenizer files: GPT-2's vocabulary is meant; stand in for tiktoken's download.
    monkeypatch.setattr(hf_tokenizer, "GPT2Tokenizer", lambda: tokenizer)
    torch.manual_seed(0)
    save_hf(GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_embd=16, n_head=2, n_layer=1,
                          block_size=BLOCK, activation="gelu_tanh")), tmp_path / "hf")
    code = sample.cli(["--checkpoint", str(tmp_path / "hf"), "--prompt", "B",
                       "--max-new-tokens", "3", "--seed", "0"])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("B") and len(out) == len("B") + 3 + 1
    assert err.startswith("using GPT-2 weights") and str(tmp_path / "hf") in err


# -- bad input: one line on stderr, non-zero exit ------------------------------------------------

def one_line_error(result) -> str:
    code, out, err = result
    assert code != 0 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("args,words", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--top-k", "0"], "top-k"),
    (["--max-new-tokens", "-1"], "max-new-tokens"),
    (["--num-samples", "0"], "num-samples"),
    (["--show-probs", "0"], "show-probs"),
    (["--interactive", "--prompt", "x"], "--interactive"),
    (["--system", "x"], "--system"),
    (["--dtype", "float64"], "--dtype: 'float64'"),
    (["--threads", "0"], "--threads"),
])
def test_bad_values(cli, args, words):
    assert words in one_line_error(cli("--prompt", "B", *args))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device(cli):
    assert "--device: cuda" in one_line_error(cli("--prompt", "B", "--device", "cuda"))


def test_unknown_prompt_characters_are_named(cli):
    err = one_line_error(cli("--prompt", "ROMEO: Zounds!"))
    assert "'Z'" in err and "'!'" in err and "'R'" not in err


def test_missing_checkpoint_lists_those_that_exist(cli, saved):
    err = one_line_error(cli("--checkpoint", "nowhere", "--prompt", "B", checkpoint=False))
    assert "nowhere" in err and str(Path("out/t/latest")) in err


def test_no_checkpoint_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sample.cli(["--prompt", "B"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python train.py" in err


def test_corrupt_checkpoint_lists_those_that_exist(saved, tmp_path, monkeypatch, capsys):
    work, run, _, _ = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (run / "latest").iterdir():
        bad.joinpath(f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    monkeypatch.chdir(work)
    assert sample.cli(["--checkpoint", str(bad), "--prompt", "B"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt" in err and str(Path("out/t/latest")) in err


def test_unreadable_prompt_file(cli, tmp_path):
    err = one_line_error(cli("--prompt-file", str(tmp_path / "missing.txt")))
    assert "missing.txt" in err


def test_long_prompt_is_cut_with_a_warning(cli):
    code, out, err = cli("--prompt", TEXT[:40], "--max-new-tokens", "3", "--seed", "0")
    assert code == 0 and out.startswith(TEXT[:40])
    assert err.count("\n") == 1 and err.startswith("warning:") and f"last {BLOCK}" in err


# -- end to end ---------------------------------------------------------------------------------

def test_subprocess_end_to_end(saved):
    work, run, _, _ = saved
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(run),
                         "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1"],
                        cwd=work, capture_output=True, text=True, timeout=120,
                        env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ROMEO:") and len(ok.stdout) > len("ROMEO:") + 5
    bad = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(run),
                          "--top-p", "2"], cwd=work, capture_output=True, text=True, timeout=120,
                         env=env)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: top-p") and bad.stderr.count("\n") == 1


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
def test_linear_layers_are_packed_unless_asked_not_to(cli):
    args = ("--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0")
    code, packed, err = cli(*args, keep_loading_line=True)
    assert code == 0 and "linear layers packed for oneDNN" in err
    code, plain, err = cli(*args, "--no-pack", keep_loading_line=True)
    assert code == 0 and "packed" not in err
    assert packed == plain
