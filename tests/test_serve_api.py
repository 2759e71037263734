"""The server's API against a tiny trained checkpoint, through real HTTP on a free local port:
the official openai client (plain and streaming), echo + logprobs against the model's own
log-softmax, every bad request, 32 concurrent requests, a client that
disconnects, the page's JSON endpoints, and Ctrl-C."""

from __future__ import annotations

import ast
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx")
openai = pytest.importorskip("openai", reason="the API tests use the official openai client")

from serve_server import failing_generate, load, running_server, train_tiny  # noqa: E402

from model.cli.serve import bind_warning  # noqa: E402
from model.inference.analysis import next_token  # noqa: E402
from model.inference.sampling import generate  # noqa: E402
from model.inference.scoring import score_tokens  # noqa: E402
from model.serve import completions, pages  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAME = "tiny"
LIMIT = 2000  # the server's max_tokens
PROMPT = "to be or"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def pretrained(run_dir):
    return load(run_dir)


@pytest.fixture(scope="module")
def server(pretrained):
    with running_server(pretrained, NAME, max_tokens=LIMIT) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=60)


def reference(pretrained, prompt, n_tokens, **kw) -> list[str]:
    """model.inference.sampling.generate's texts, one per sample."""
    n = kw.get("num_samples", 1)
    texts = [""] * n
    for step in generate(pretrained.model, pretrained.tokenizer, prompt, max_new_tokens=n_tokens,
                         **kw):
        texts[step.sample] += step.delta
    return texts


def model_logprobs(pretrained, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 from the model's own forward pass."""
    with torch.no_grad():
        logits = pretrained.model(torch.tensor([ids]))[0][0].float()
    lp = logits.log_softmax(dim=-1)
    return [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]


def test_the_routers_are_siblings_that_never_import_each_other():
    """What two endpoints share lives in a module both import (completions, prompts, protocol),
    never in one of them."""
    routers = {"openai_api", "chat_api", "pages"}
    for name in routers:
        tree = ast.parse((ROOT / "model" / "serve" / f"{name}.py").read_text(encoding="utf-8"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("model.serve"):
                imported.add(node.module.rpartition(".")[2])
                imported.update(alias.name for alias in node.names)
        assert not imported & (routers - {name}), name


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_greedy_text_equals_generate(client, pretrained):
    resp = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0)
    assert resp.choices[0].text == reference(pretrained, PROMPT, 40, temperature=0)[0]
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(PROMPT) and resp.usage.completion_tokens == 40


@pytest.mark.slow
def test_greedy_text_equals_sample_cli(client, run_dir):
    out = subprocess.run(
        [sys.executable, "sample.py", "--checkpoint", str(run_dir), "--temperature", "0",
         "--prompt", PROMPT, "--max-new-tokens", "30"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    resp = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0)
    assert out.stdout == PROMPT + resp.choices[0].text + "\n"


def test_streamed_chunks_join_to_the_same_text(client, server):
    plain = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=25, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=25,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    with httpx.stream("POST", f"{server[0]}/v1/completions", timeout=30,
                      json={"prompt": PROMPT, "max_tokens": 3, "stream": True, "seed": 0,
                            "temperature": 0, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)
    usage = json.loads(lines[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def chunks_of(url: str, path: str, body: dict) -> list[dict]:
    """A stream's JSON chunks (without the closing [DONE])."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=30) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_nothing_to_generate_still_ends_every_choice_with_length(server):
    """max_tokens 0 on both OpenAI endpoints: each choice ends with "length", whole and
    streamed (a closing chunk per prompt)."""
    url = server[0]
    body = {"prompt": [PROMPT, "the"], "max_tokens": 0, "n": 2}
    whole = httpx.post(f"{url}/v1/completions", json=body).json()["choices"]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in whole] == [
        (i, "", "length") for i in range(4)]
    chunks = chunks_of(url, "/v1/completions", body)
    assert [[(c["index"], c["text"], c["finish_reason"]) for c in chunk["choices"]]
            for chunk in chunks] == [[(0, "", "length"), (1, "", "length")],
                                     [(2, "", "length"), (3, "", "length")]]
    chat = {"messages": [{"role": "user", "content": "to"}], "max_tokens": 0, "n": 2}
    whole = httpx.post(f"{url}/v1/chat/completions", json=chat).json()["choices"]
    assert [(c["message"]["content"], c["finish_reason"]) for c in whole] == [("", "length")] * 2
    last = chunks_of(url, "/v1/chat/completions", chat)[-1]["choices"]
    assert [(c["delta"], c["finish_reason"]) for c in last] == [({}, "length")] * 2


def test_usage_rides_on_the_chunks_as_openai_sends_it(server):
    """With include_usage, a chat stream has "usage": null on every chunk but the last (as
    OpenAI's does); a completions stream names it on the last only."""
    url = server[0]
    options = {"max_tokens": 3, "temperature": 0, "stream_options": {"include_usage": True}}
    chat = chunks_of(url, "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "to"}], **options})
    assert all("usage" in c and c["usage"] is None for c in chat[:-1])
    assert chat[-1]["usage"]["completion_tokens"] == 3
    text = chunks_of(url, "/v1/completions", {"prompt": PROMPT, **options})
    assert all("usage" not in c for c in text[:-1])
    assert text[-1]["usage"]["completion_tokens"] == 3


def test_a_null_temperature_is_openais_default_and_logprobs_stay_numbers(server):
    """temperature null samples at 1 on both endpoints; a probability that underflows is
    reported as a log-probability of -1e4, since JSON has no -inf."""
    url = server[0]
    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "to"}]})):
        answers = [httpx.post(url + path, json={**body, "max_tokens": 12, "seed": 4,
                                                "temperature": t}).json()["choices"]
                   for t in (None, 1.0)]
        assert answers[0] == answers[1]
    assert completions.logprob(0.0) == completions.finite(float("-inf")) == -1e4


def test_stop_strings_end_the_text_as_generate_does(client, pretrained):
    resp = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0,
                                     stop=["he", "xyz"])
    expected = reference(pretrained, PROMPT, 40, temperature=0, stop=["he", "xyz"])[0]
    assert resp.choices[0].text == expected and "he" not in expected
    assert resp.choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_generate(client, pretrained):
    kw = dict(temperature=0.9, top_p=0.9, seed=3)
    resp = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, n=2, **kw)
    expected = reference(pretrained, PROMPT, 20, num_samples=2, **kw)
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == expected
    top_k = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, seed=5,
                                      extra_body={"top_k": 3})  # vLLM's extension
    assert top_k.choices[0].text == reference(pretrained, PROMPT, 20, seed=5, top_k=3)[0]
    again = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, n=2, **kw)
    assert [c.text for c in again.choices] == [c.text for c in resp.choices]


@pytest.mark.parametrize("max_tokens", [0, 6])
def test_echo_logprobs_equal_the_models_log_softmax(client, pretrained, max_tokens):
    resp = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=max_tokens,
                                     temperature=0, echo=True, logprobs=3)
    choice = resp.choices[0]
    lp = choice.logprobs
    generated = reference(pretrained, PROMPT, max_tokens, temperature=0)[0]
    assert choice.text == PROMPT + generated
    ids = pretrained.tokenizer.encode(PROMPT + generated)  # char tokens: one per character
    assert lp.tokens == [pretrained.tokenizer.token_text(i) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(model_logprobs(pretrained, ids), abs=1e-4)
    assert lp.text_offset == list(range(len(ids)))
    for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]):
        assert token in top and 3 <= len(top) <= 4


def test_echo_logprobs_for_token_id_prompts(client, pretrained):
    first = pretrained.tokenizer.encode("to be or not")
    second = pretrained.tokenizer.encode("the mind")
    resp = client.completions.create(model=NAME, prompt=[first, second], max_tokens=0,
                                     echo=True, logprobs=1)
    assert [c.index for c in resp.choices] == [0, 1]
    for choice, ids in zip(resp.choices, (first, second)):
        assert choice.text == pretrained.tokenizer.decode(ids)
        assert choice.logprobs.token_logprobs[0] is None
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(
            model_logprobs(pretrained, ids), abs=1e-4)
    single = client.completions.create(model=NAME, prompt=first, max_tokens=0, echo=True,
                                       logprobs=0)
    assert single.choices[0].logprobs.token_logprobs == resp.choices[0].logprobs.token_logprobs


def test_echo_logprobs_equal_model_scoring(client, pretrained):
    """The server's echo + logprobs and Python's model.inference.scoring are one computation."""
    resp = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=0, echo=True,
                                     logprobs=2)
    lp = resp.choices[0].logprobs
    ids = pretrained.tokenizer.encode(PROMPT)
    scores = score_tokens(pretrained.model, ids, top=2)
    assert lp.token_logprobs[1:] == scores.logprobs.tolist()
    for top, row_ids, row_lp in zip(lp.top_logprobs[1:], scores.top_ids.tolist(),
                                    scores.top_logprobs.tolist()):
        texts = [pretrained.tokenizer.token_text(i) for i in row_ids]
        assert all(top[t] == v for t, v in zip(texts, row_lp))


def test_streamed_logprobs_match_plain(client):
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, echo=True)
    plain = client.completions.create(**kw).choices[0].logprobs
    tokens, lps = [], []
    for chunk in client.completions.create(stream=True, **kw):
        tokens += chunk.choices[0].logprobs.tokens
        lps += chunk.choices[0].logprobs.token_logprobs
    assert tokens == plain.tokens and lps == pytest.approx(plain.token_logprobs)


BAD = [  # (path, body or raw bytes, status, param)
    ("/v1/completions", b'{"prompt": "to be", ', 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, "a"]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "to", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "to", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "to", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "to", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "to", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "to", "max_tokens": LIMIT + 1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "to", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "to be " * 10}, 400, "prompt"),
    ("/v1/completions", {"prompt": [0, 9999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "ROMEO"}, 400, "prompt"),  # not in the char vocabulary
    ("/v1/completions", {"prompt": "to", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "to", "model": "../../etc/passwd"}, 404, "model"),
    ("/v1/completions", {"prompt": "to", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "to", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "to", "stop": ""}, 400, "stop"),
    ("/v1/completions", {"prompt": "to", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "to", "echo": 1}, 400, "echo"),
    ("/v1/completions", {"prompt": "to", "seed": 1.5}, 400, "seed"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
    ("/api/attention", {"prompt": "to be", "layer": 99}, 400, "layer"),
    ("/api/distribution", {"tokens": [1, 2], "temperatures": [3]}, 400, "temperatures[0]"),
    ("/api/distribution", {"tokens": [1], "temperatures": [1, -1]}, 400, "temperatures[1]"),
    ("/api/neighbors", {"word": "ROMEO"}, 400, "word"),
    ("/api/generate", {"prompt": "to", "top_k": 0}, 400, "top_k"),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, path, body,
                                                                        status, param):
    url = server[0]
    if isinstance(body, bytes):
        r = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = httpx.post(url + path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if param:
        assert param in error["message"]
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "to", "max_tokens": 2})
    assert ok.status_code == 200


def test_the_openai_client_reports_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="to", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.completions.create(model="gpt-4", prompt="to")


def test_no_request_reaches_the_filesystem(server):
    url = server[0]
    for path in ("/static/../../pyproject.toml", "/static/%2e%2e/app.py", "/../../etc/passwd"):
        assert httpx.get(url + path).status_code == 404
    assert httpx.get(url + "/").status_code == 200 and "smallgpt" in httpx.get(url + "/").text


def test_32_concurrent_requests_all_complete_correctly(client, pretrained):
    jobs = [(p, seed, stream) for p in ("to be", "the mind", "or not")
            for seed in range(6) for stream in (False, True)][:32]
    expected = [reference(pretrained, p, 20, temperature=0.8, seed=seed)[0]
                for p, seed, _ in jobs]

    def call(job):
        prompt, seed, stream = job
        kw = dict(model=NAME, prompt=prompt, max_tokens=20, temperature=0.8, seed=seed)
        if not stream:
            return client.completions.create(**kw).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))

    with ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(call, jobs)) == expected


def test_a_client_that_disconnects_stops_its_generation(server):
    url, app = server
    engine = app.state.served.engine
    before = engine.steps
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30, json={
            "prompt": PROMPT, "max_tokens": LIMIT, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0
    assert engine.steps - before < LIMIT / 2  # it stopped long before max_tokens
    before = engine.steps
    with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
        httpx.post(f"{url}/v1/completions", timeout=0.1, json={
            "prompt": PROMPT, "max_tokens": LIMIT, "temperature": 0})
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0 and engine.steps - before < LIMIT


def settle(engine, quiet: float = 0.5, limit: float = 20) -> None:
    """Wait until the engine has been idle for `quiet` seconds: between the prompts of one
    request it is briefly idle, so `engine.active == 0` alone does not mean the work is over."""
    deadline = time.monotonic() + limit
    last, since = engine.steps, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if engine.steps != last or engine.active:
            last, since = engine.steps, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def test_a_client_that_disconnects_stops_a_request_of_many_prompts(server):
    """The prompts run as one batch (64 rows), whose steps the job checks every 16 steps: it
    sees the client go long before the batch is done."""
    url, app = server
    engine = app.state.served.engine
    prompts = ["to be", "or not", "the mind", "whether"] * 4
    total = len(prompts) * 4 * 100  # n=4 samples of 100 tokens each
    settle(engine)
    before = engine.steps
    with pytest.raises(httpx.TimeoutException):  # the whole request takes ~0.9 s here
        httpx.post(f"{url}/v1/completions", timeout=0.05, json={
            "prompt": prompts, "n": 4, "max_tokens": 100, "temperature": 0})
    settle(engine)
    assert engine.active == 0 and engine.steps - before < total / 2


def sse(response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_a_failure_mid_stream_ends_with_an_error_then_done(server, monkeypatch, caplog):
    """A bug that surfaces after the 200 went out: the client gets an OpenAI-style error event
    and [DONE] (the openai client raises it), the log gets the traceback."""
    url = server[0]
    monkeypatch.setattr(completions, "generate", failing_generate(3, ValueError("a bug")))
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stream": True}
    with caplog.at_level(logging.ERROR, logger="smallgpt.serve"):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            data = sse(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert [len(c["choices"]) for c in chunks[:-1]] == [1, 1, 1]  # the tokens before it failed
    error = chunks[-1]["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "ValueError" in error["message"]
    assert "internal error in the stream of /v1/completions" in caplog.text
    assert "ValueError: a bug" in caplog.text  # with its traceback
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
    with pytest.raises(openai.APIError, match="internal server error"):
        list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, stream=True))


def test_a_failure_mid_stream_sends_the_page_an_error_event(server, monkeypatch, caplog):
    url = server[0]
    monkeypatch.setattr(pages, "generate", failing_generate(2, RuntimeError("a bug")))
    with caplog.at_level(logging.ERROR, logger="smallgpt.serve"):
        with httpx.stream("POST", f"{url}/api/generate", timeout=30,
                          json={"prompt": PROMPT, "max_tokens": 20}) as r:
            events = [json.loads(d) for d in sse(r)]
    assert [e["type"] for e in events] == ["prompt", "token", "token", "error"]  # no "done"
    assert "RuntimeError" in events[-1]["message"] and events[-1]["code"] == "internal_error"
    assert "internal error in the stream of /api/generate" in caplog.text


def test_streams_open_at_shutdown_end_with_an_error_then_done(pretrained):
    """The engine stops (as at Ctrl-C) while streams are open: each ends saying so, and a
    request that comes in afterwards is a 503, not a 500."""
    with running_server(pretrained, NAME, max_tokens=LIMIT) as (url, app):
        engine = app.state.served.engine
        body = {"prompt": PROMPT, "max_tokens": LIMIT, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                          json={**body, "stream": True}) as api, \
                httpx.stream("POST", f"{url}/api/generate", timeout=30, json=body) as page:
            api_lines, page_lines = api.iter_lines(), page.iter_lines()
            for lines in (api_lines, page_lines):
                for _ in range(3):
                    next(lines)
            engine.stop()
            api_data = [x[6:] for x in api_lines if x.startswith("data: ")]
            page_events = [json.loads(x[6:]) for x in page_lines if x.startswith("data: ")]
        assert api_data[-1] == "[DONE]"
        error = json.loads(api_data[-2])["error"]
        assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
        assert page_events[-1]["type"] == "error"
        assert page_events[-1]["code"] == "server_shutting_down"
        late = httpx.post(f"{url}/v1/completions", json=body)
        assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down"


def test_distribution_endpoint_reproduces_the_streamed_steps(server, pretrained):
    """The page's live temperature view: /api/distribution over each step's context (which
    slides once the context is full) gives back the probabilities the stream reported."""
    url = server[0]
    body = {"prompt": PROMPT, "max_tokens": 60, "temperature": 1.0, "seed": 0, "k": 5}
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=30) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    assert events[0]["type"] == "prompt" and events[-1]["type"] == "done"
    steps = [e for e in events if e["type"] == "token"]
    ids = [t["id"] for t in events[0]["tokens"]] + [s["token"] for s in steps]
    assert len(steps) == 60 and steps[-1]["context_start"] > 0  # the window has moved on
    for step in steps[::7]:
        context = ids[step["context_start"]:len(events[0]["tokens"]) + step["index"]]
        dist = httpx.post(f"{url}/api/distribution", json={
            "tokens": context, "temperatures": [1.0, 0.5, 0], "k": 5,
            "include": [step["token"]]}).json()
        shown = {t["id"]: p for t, p in zip(dist["tokens"], dist["probs"][0])}
        assert shown[step["token"]] == pytest.approx(step["prob"], abs=1e-4)
        for alt in step["top"]:
            assert shown[alt["id"]] == pytest.approx(alt["prob"], abs=1e-4)
        for row, rest in zip(dist["probs"], dist["rest"]):
            assert sum(row) + rest == pytest.approx(1.0, abs=1e-4)
        assert dist["probs"][1][0] > dist["probs"][0][0]  # T < 1 sharpens


def test_the_page_and_explore_next_show_one_next_token_distribution(server, pretrained):
    """/api/distribution and `python -m model.explore next` (analysis.next_token) are one
    computation: the same tokens, logits and probabilities, to the last bit."""
    tokenizer, temperatures = pretrained.tokenizer, [0.5, 1.0, 2.0]
    found = next_token(pretrained.model, tokenizer, PROMPT, temperatures, k=5)
    dist = httpx.post(f"{server[0]}/api/distribution", json={
        "tokens": tokenizer.encode(PROMPT), "temperatures": temperatures, "k": 5}).json()
    assert [(t["id"], t["text"], t["logit"]) for t in dist["tokens"]] == [
        (s.id, s.token, s.score) for s in found.top]
    assert dist["probs"] == found.probs and dist["rest"] == found.other
    # Temperature 0 is greedy decoding's view: the plain softmax, which top-k cannot change.
    ids = tokenizer.encode(PROMPT)
    greedy = httpx.post(f"{server[0]}/api/distribution", json={
        "tokens": ids, "temperatures": [0], "k": 5, "top_k": 1}).json()
    with torch.no_grad():
        probs = pretrained.model(torch.tensor([ids]))[0][0, -1].float().softmax(dim=-1)
    assert greedy["probs"][0] == pytest.approx(
        probs[[t["id"] for t in greedy["tokens"]]].tolist(), abs=1e-6)


def test_attention_and_embedding_endpoints(server, pretrained):
    url = server[0]
    att = httpx.post(f"{url}/api/attention", json={"prompt": "to be", "head": 1}).json()
    assert att["tokens"] == list("to be") and att["head"] == 1 and att["layer"] == 1
    assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in att["weights"])
    near = httpx.post(f"{url}/api/neighbors", json={"word": "e", "k": 4}).json()
    assert len(near["neighbors"]) == 4 and near["query"]["ids"] == [pretrained.tokenizer.encode(
        "e")[0]]
    ana = httpx.post(f"{url}/api/analogy", json={"a": "b", "b": "t", "c": "o"}).json()
    assert len(ana["answers"]) == 10
    way = httpx.post(f"{url}/api/direction", json={"positive": "s", "negative": "t",
                                                   "words": "e n o"}).json()
    assert sorted(p["word"]["word"] for p in way["projections"]) == ["e", "n", "o"]
    info = httpx.get(f"{url}/api/info").json()
    assert info["model"] == NAME and info["n_layer"] == 2 and info["max_tokens"] == LIMIT


def test_binding_beyond_this_machine_warns():
    assert bind_warning("127.0.0.1") is None and bind_warning("localhost") is None
    assert "anyone who can reach" in bind_warning("0.0.0.0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("front", [["-m", "model.serve"], ["sample.py", "--serve"]])
def test_ctrl_c_shuts_the_server_down_cleanly(run_dir, front):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *front, "--checkpoint", str(run_dir), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == str(
            run_dir)
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json={
                "prompt": PROMPT, "max_tokens": 1000, "stream": True}) as r:
            next(r.iter_lines())  # a stream is open when Ctrl-C comes
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "server stopped" in err
    assert "playground: http://127.0.0.1:" in err and "anyone who can reach" not in err


def test_a_busy_port_is_one_line(run_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "model.serve", "--checkpoint", str(run_dir),
                              "--port", str(port)], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
