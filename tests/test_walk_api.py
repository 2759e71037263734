"""POST /api/walk over real HTTP: the library's walk as JSON, its softmax step equal to
/v1/completions' logprobs, token ids as the prompt, and every bad request a 4xx in OpenAI's
error shape naming its field."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx")

from serve_server import running_server  # noqa: E402

from model.data.tokenizer import CharTokenizer  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from model.inference.analysis import to_jsonable  # noqa: E402
from model.inference.walk import walk  # noqa: E402
from model.weights.loading import Pretrained  # noqa: E402

CHARS = " .abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    tokenizer = CharTokenizer(CHARS)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2,
                          n_embd=16, norm="rmsnorm", tie_embeddings=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6 if p.dim() > 1 else 1)
    pretrained = Pretrained(model=model, tokenizer=tokenizer, kind="smallgpt", path=Path("w"),
                            description="a walk test model")
    with running_server(pretrained, "w") as (url, _):
        yield url, model, tokenizer


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/api/walk", json=body, timeout=60)


def test_the_endpoint_serves_the_library_walk(served):
    url, model, tok = served
    body = {"prompt": "the cat", "temperature": 0.5, "seed": 9, "k": 3, "head": 1}
    reply = post(url, body)
    assert reply.status_code == 200
    expected = to_jsonable(walk(model, tok, "the cat", temperature=0.5, seed=9, k=3, head=1))
    assert reply.json() == expected
    ids = tok.encode("the cat")
    by_ids = post(url, {**body, "prompt": "ignored", "tokens": ids}).json()
    assert by_ids == expected  # tokens replace the prompt


def test_the_softmax_step_at_temperature_1_is_the_completions_logprobs(served):
    url, _, _ = served
    stages = post(url, {"prompt": "the cat s", "k": 5}).json()["stages"]
    (soft,) = [s for s in stages if s["stage"] == "softmax"]
    dist = soft["distribution"]
    assert dist["temperatures"] == [1.0]
    api = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": "the cat s", "max_tokens": 1, "logprobs": 5, "temperature": 1}).json()
    top = sorted(api["choices"][0]["logprobs"]["top_logprobs"][0].items(), key=lambda kv: -kv[1])
    assert [c["text"] for c in dist["tokens"]] == [t for t, _ in top[:5]]
    assert dist["probs"][0] == pytest.approx([math.exp(lp) for _, lp in top[:5]], rel=1e-4)


@pytest.mark.parametrize("body, status, param, code", [
    ({"prompt": "THE CAT"}, 400, "prompt", None),
    ({"prompt": "a" * 17}, 400, "prompt", "context_length_exceeded"),
    ({"tokens": [1] * 17}, 400, "tokens", "context_length_exceeded"),
    ({"tokens": [999]}, 400, "tokens", "invalid_value"),
    ({"head": 2}, 400, "head", "invalid_value"),
    ({"k": 21}, 400, "k", "invalid_value"),
    ({"temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"temperatures": []}, 400, "temperatures", "invalid_value"),
    ({"top_p": 0}, 400, "top_p", "invalid_value"),
    ({"seed": "1"}, 400, "seed", "invalid_type"),
])
def test_bad_requests_are_4xx_naming_the_field(served, body, status, param, code):
    reply = post(served[0], {"prompt": "the", **body})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["param"] == param and error["code"] == code and error["message"]


def test_an_empty_prompt_starts_a_document(served):
    url, _, tok = served
    for body in ({"prompt": ""}, {"tokens": []}):
        tokens = post(url, body).json()["stages"][0]["tokens"]
        assert [t["id"] for t in tokens] == [tok.eot_id]
