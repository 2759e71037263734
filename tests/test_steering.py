"""Steering that cannot be lost: generate's fwd_hooks hold for the whole generation however the
generator is consumed (and only during its forward passes), hooks read each token's index in
its text under the KV cache and after the window moves on, steering vector files and their
errors, and --steer in sample.py and the server (scale 0 changes nothing)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model import GPT, Config, ConfigError, GPTConfig
from model.data.tokenizer import train_tokenizer
from model.inference.sampling import generate
from model.weights.checkpoint import save_checkpoint
from model.weights.steering import load_steering

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model.cli import sample  # noqa: E402

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET: Ay me.\n\n"
BLOCK = 16
WIDTH = 16
LAYER = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny char model saved as a run, and a steering vector for it: (run, model, tokenizer,
    vector file)."""
    work = tmp_path_factory.mktemp("steer")
    tokenizer = train_tokenizer("char", [TEXT])
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=2, n_head=2,
                       n_embd=WIDTH)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    run = work / "run"
    save_checkpoint(run / "latest", model, Config(model=config, name="t"), tokenizer.spec())
    vector = torch.randn(WIDTH, generator=torch.Generator().manual_seed(1)) * 3
    torch.save(vector, work / "v.pt")
    return run, model.eval(), tokenizer, work / "v.pt"


def adder(vector: torch.Tensor):
    return lambda resid, hook: resid + vector


def tokens(steps) -> list[int]:
    return [s.token for s in steps]


# -- generate's fwd_hooks ---------------------------------------------------------------------

def test_a_lazily_consumed_steered_generator_equals_an_eager_one(saved):
    _, model, tokenizer, _ = saved
    steer = [(LAYER, adder(3 * torch.load(saved[3])))]  # not constant: LayerNorm centres
    kwargs = dict(max_new_tokens=3 * BLOCK, temperature=0, ignore_eot=True)
    eager = tokens(generate(model, tokenizer, "ROMEO:", fwd_hooks=steer, **kwargs))
    plain = tokens(generate(model, tokenizer, "ROMEO:", **kwargs))
    assert eager != plain  # the steering changes the text, so the comparison means something
    idx = torch.tensor([tokenizer.encode("But soft")])
    unsteered = model(idx)[0]
    lazy = []
    generator = generate(model, tokenizer, "ROMEO:", fwd_hooks=steer, **kwargs)
    assert not model.hook_dict[LAYER].active  # nothing registered before it starts
    for step in generator:
        lazy.append(step.token)
        assert not model.hook_dict[LAYER].active  # nor while it waits
        assert torch.equal(model(idx)[0], unsteered)  # other work in between is unsteered
    assert lazy == eager


def test_a_generator_closed_early_leaves_no_hook_and_names_are_checked_at_the_call(saved):
    _, model, tokenizer, _ = saved
    generator = generate(model, tokenizer, "ROMEO:", max_new_tokens=10,
                         fwd_hooks=[(LAYER, adder(torch.ones(WIDTH)))])
    next(generator)
    generator.close()
    assert not any(hp.active for hp in model.hook_dict.values())
    with pytest.raises(KeyError, match="hook_resid_psot"):
        generate(model, tokenizer, "ROMEO:", fwd_hooks=[("blocks.0.hook_resid_psot", print)])


@pytest.mark.parametrize("use_cache", [True, False])
def test_hooks_read_positions_in_the_whole_text_past_the_window(saved, use_cache):
    """The newest token of each step sits at prompt length - 1 + step in its text, also once
    the window has moved on, for a prompt longer than the context too. (With the cache, a row
    whose window moves on is refilled by a pass of its own, just before the batch's pass, in
    which it is padding: -1.)"""
    _, model, tokenizer, _ = saved
    prompts = ["ROMEO:", "But soft, what light through"]  # 6 and 28 tokens (cropped to 16)
    passes = []
    with pytest.warns(UserWarning, match="using its last"):
        list(generate(model, tokenizer, prompts, max_new_tokens=3 * BLOCK, temperature=0,
                      ignore_eot=True, use_cache=use_cache, fwd_hooks=[
                          (LAYER, lambda x, hook: passes.append(hook.positions[:, -1].tolist()))]))
    steps, pending = [], []
    for newest in passes:
        pending += newest
        if len(newest) == len(prompts):  # the batch's pass ends a step
            steps.append(sorted(p for p in pending if p >= 0))
            pending = []
    assert steps == [[6 - 1 + i, 28 - 1 + i] for i in range(3 * BLOCK)]
    assert len(passes) > 3 * BLOCK if use_cache else len(passes) == 3 * BLOCK


# -- steering vector files --------------------------------------------------------------------

def test_steering_adds_the_scaled_vector_to_the_residual_stream(saved, tmp_path):
    _, model, _, file = saved
    vector = torch.load(file)
    save_file({"direction": vector}, tmp_path / "v.safetensors")
    idx = torch.tensor([[1, 2, 3]])
    expected = model.run_with_hooks(idx, fwd_hooks=[("blocks.1.hook_resid_post",
                                                     adder(2.5 * vector))])
    for path in (file, tmp_path / "v.safetensors"):
        steering = load_steering(path, model, layer=1, scale=2.5)
        torch.testing.assert_close(model.run_with_hooks(idx, fwd_hooks=steering.hooks()),
                                   expected)
        assert steering.describe()["hook"] == "blocks.1.hook_resid_post"


def test_bad_steering_vectors_are_named_in_one_line(saved, tmp_path):
    _, model, _, file = saved
    torch.save(torch.zeros(WIDTH + 1), tmp_path / "wide.pt")
    torch.save({"a": torch.zeros(WIDTH), "b": torch.zeros(WIDTH)}, tmp_path / "two.pt")
    torch.save(torch.full((WIDTH,), float("nan")), tmp_path / "nan.pt")
    torch.save(torch.zeros(WIDTH, dtype=torch.long), tmp_path / "ints.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    (tmp_path / "v.npy").write_bytes(b"")
    cases = [(tmp_path / "missing.pt", 0, "does not exist"),
             (tmp_path / "v.npy", 0, ".pt or .safetensors"),
             (tmp_path / "wide.pt", 0, f"{WIDTH} wide"),
             (tmp_path / "two.pt", 0, "one floating-point tensor"),
             (tmp_path / "ints.pt", 0, "one floating-point tensor"),
             (tmp_path / "nan.pt", 0, "inf or NaN"),
             (tmp_path / "junk.safetensors", 0, "cannot be read"),
             (file, 2, "layers 0..1"),
             (file, -1, "layers 0..1")]
    for path, layer, words in cases:
        with pytest.raises(ConfigError, match=words) as err:
            load_steering(path, model, layer)
        assert "\n" not in str(err.value)


# -- sample.py --------------------------------------------------------------------------------

@pytest.fixture
def cli(saved, monkeypatch, capsys):
    run = saved[0]

    def call(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        code = sample.cli(["--checkpoint", str(run), "--threads", "1", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_sample_steer_with_scale_zero_is_no_steering(cli, saved):
    _, model, tokenizer, file = saved
    greedy = ["--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "40"]
    plain = cli(*greedy)
    zero = cli(*greedy, "--steer", str(file), "--steer-layer", "0", "--steer-scale", "0")
    assert plain[0] == zero[0] == 0 and plain[1] == zero[1]
    assert f"steering: {file} x 0.0 added to blocks.0.hook_resid_post" in zero[2]
    steered = cli(*greedy, "--steer", str(file), "--steer-layer", "0", "--steer-scale", "3")
    vector = torch.load(file)
    library = "".join(s.delta for s in generate(
        model, tokenizer, "ROMEO:", max_new_tokens=40, temperature=0,
        fwd_hooks=[(LAYER, adder(3 * vector))]))
    assert steered[1] == "ROMEO:" + library + "\n" != plain[1]


@pytest.mark.parametrize("args,words", [
    (["--steer", "v.pt"], "--steer needs --steer-layer"),
    (["--steer-layer", "1"], "only apply with --steer"),
    (["--steer-scale", "2"], "only apply with --steer"),
    (["--steer", "missing.pt", "--steer-layer", "0"], "does not exist"),
    (["--steer", "{file}", "--steer-layer", "5"], "layers 0..1"),
    (["--steer", "{file}", "--steer-layer", "0", "--steer-scale", "nan"], "finite"),
])
def test_bad_steer_options_are_one_line(cli, saved, args, words):
    args = [a.format(file=saved[3]) for a in args]
    code, _, err = cli("--prompt", "R", *args)
    assert code == 2 and words in err and len(err.strip().splitlines()) <= 2


# -- the server -------------------------------------------------------------------------------

def server_answers(saved, steering, bodies):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from model.serve import create_app
    from model.weights.loading import load_model

    pretrained = load_model(str(saved[0]), "cpu")
    with TestClient(create_app(pretrained, "t", steering=steering and load_steering(
            saved[3], pretrained.model, *steering))) as client:
        info = client.get("/api/info").json()
        replies = [client.post(path, json=body).json() for path, body in bodies]
    assert not any(hp.active for hp in pretrained.model.hook_dict.values())  # removed at stop
    for reply in replies:
        reply.pop("id", None), reply.pop("created", None)
    return info, replies


def test_the_server_steers_everything_and_says_so(saved):
    bodies = [("/v1/completions", {"prompt": ["ROMEO:", "But"], "max_tokens": 20,
                                   "temperature": 0.8, "seed": 3, "n": 2, "logprobs": 2}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Ay"}],
                                        "max_tokens": 10, "temperature": 0}),
              ("/api/distribution", {"tokens": [1, 2, 3], "temperatures": [0, 1], "k": 3})]
    info, plain = server_answers(saved, None, bodies)
    assert info["steering"] is None
    info, zero = server_answers(saved, (0, 0.0), bodies)
    assert zero == plain
    assert info["steering"] == {"file": str(saved[3]), "layer": 0, "scale": 0.0,
                                "hook": LAYER, "norm": pytest.approx(info["steering"]["norm"])}
    _, steered = server_answers(saved, (0, 4.0), bodies)
    assert steered[0]["choices"][0]["text"] != plain[0]["choices"][0]["text"]


def test_the_page_shows_a_notice_when_steering_is_on():
    static = ROOT / "model" / "serve" / "static"
    assert 'id="steering-notice"' in (static / "index.html").read_text()
    script = (static / "app.js").read_text()
    assert "info.steering" in script and '$("steering-notice").hidden = false' in script


def test_a_browser_sees_the_notice_only_when_steering_is_on(saved):
    """The page in headless chromium (skipped as tests/test_serve_browser.py skips)."""
    browser = pytest.importorskip("test_serve_browser")
    if browser.MISSING:
        browser.unavailable(browser.MISSING)
    from selenium.webdriver.support.ui import WebDriverWait
    from serve_server import running_server

    from model.weights.loading import load_model

    options = browser.webdriver.ChromeOptions()
    options.binary_location = browser.CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = browser.webdriver.Chrome(service=browser.webdriver.ChromeService(
        browser.CHROMEDRIVER), options=options)

    def shown(d):
        return d.find_element(*browser.by_id("steering-notice"))

    try:
        for scale in (None, 2.0):
            pretrained = load_model(str(saved[0]), "cpu")
            steering = None if scale is None else load_steering(saved[3], pretrained.model, 1,
                                                                scale)
            with running_server(pretrained, "t", steering=steering) as (url, _):
                driver.get(url + "/")
                wait = WebDriverWait(driver, 30)
                wait.until(lambda d: "context" in d.find_element(*browser.by_id("model-info")).text)
                if scale is None:
                    assert not shown(driver).is_displayed()  # /api/info came back: no notice
                else:
                    wait.until(lambda d: shown(d).is_displayed())
                    assert "Steering vector on" in shown(driver).text
                    assert "blocks.1.hook_resid_post" in shown(driver).text
    finally:
        driver.quit()


def test_the_server_command_lines_take_the_steer_options(saved, monkeypatch, capsys):
    """sample.py --serve and python -m model.serve hand --steer to the app (uvicorn's run is
    replaced by a stand-in that keeps the app)."""
    uvicorn = pytest.importorskip("uvicorn")
    from model.cli import serve

    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: apps.append(self.config.app))
    run, file = str(saved[0]), str(saved[3])
    steer = ["--steer", file, "--steer-layer", "1", "--steer-scale", "0.5"]
    assert sample.cli(["--serve", "--checkpoint", run, "--port", "0", *steer]) == 0
    assert serve.main(["--checkpoint", run, "--port", "0", *steer]) == 0
    assert serve.main(["--checkpoint", run, "--port", "0"]) == 0
    described = [app.state.served.steering and app.state.served.steering.describe()
                 for app in apps]
    assert [d and (d["layer"], d["scale"], d["file"]) for d in described] == [
        (1, 0.5, file), (1, 0.5, file), None]
    capsys.readouterr()
    assert serve.main(["--checkpoint", run, "--port", "0", "--steer", file]) == 2
    assert "--steer needs --steer-layer" in capsys.readouterr().err
