"""A schema-driven fuzzer (schemathesis) against /openapi.json: requests the schema allows are
accepted, requests it does not are refused with a 4xx in OpenAI's error format, and nothing,
either way, is a 5xx. Seeded and bounded (a few hundred requests, well under a minute), on an
untrained model: the fuzz is about the protocol, not the text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (fastapi, uvicorn)")
schemathesis = pytest.importorskip("schemathesis", reason="the fuzz needs schemathesis (dev)")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    status_code_conformance,
)
from serve_server import running_server  # noqa: E402

from model.data.tokenizer import CharTokenizer  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from model.weights.loading import Pretrained  # noqa: E402

LIMIT = 4  # the server's max_tokens: the fuzz checks the protocol, not long generations
CHARS = "\n !',.:?ASUabcdefghijklmnopqrstuvwxyz"  # with the chat template's role headers


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=len(CHARS) + 1, n_layer=1, n_head=2, n_embd=16)
    pretrained = Pretrained(model=GPT(config).eval(), tokenizer=CharTokenizer(CHARS),
                            kind="smallgpt", path=Path("fuzz"),
                            description="an untrained char model for the fuzz")
    with running_server(pretrained, "fuzz", max_tokens=LIMIT) as (url, app):
        yield url, schemathesis.openapi.from_url(f"{url}/openapi.json")


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def fuzz(server, mode: GenerationMode, examples: int) -> list[tuple[str, int]]:
    """`examples` requests drawn by schemathesis in `mode` over every operation, seeded; the
    (operation, status) of each, after checking it."""
    url, schema = server
    ops = operations(schema)
    seen: list[tuple[str, int]] = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data) -> None:
        op = data.draw(st.sampled_from(ops))
        case = data.draw(op.as_strategy(generation_mode=mode))
        response = case.call(base_url=url, timeout=30)
        seen.append((op.label, response.status_code))
        judge(mode, op.label, case, response)

    run()
    return seen


def judge(mode: GenerationMode, label: str, case, response) -> None:
    # schemathesis's own checks: no 5xx, a status and a content type the schema documents.
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                             content_type_conformance])
    status = response.status_code
    sent = f"{label} with {case.body!r}"
    assert status < 500, f"{sent}: {status} {response.text[:300]}"
    if status >= 400:
        error = response.json()["error"]  # every refusal in OpenAI's format, with a message
        assert error["message"] and error["type"], sent
    if mode == GenerationMode.POSITIVE:
        # The one limit a JSON schema cannot state: the tokens of a whole conversation must fit
        # the context. Everything else the schema allows is served.
        fits = status == 400 and response.json()["error"]["code"] == "context_length_exceeded"
        assert 200 <= status < 300 or fits, f"{sent}: {status} {response.text[:300]}"


def test_schema_valid_requests_are_accepted(server):
    seen = fuzz(server, GenerationMode.POSITIVE, 150)
    assert len({label for label, _ in seen}) >= 10  # the fuzz reached most operations
    assert sum(200 <= s < 300 for _, s in seen) >= 0.8 * len(seen)


def test_invalid_requests_get_4xx_never_5xx(server):
    seen = fuzz(server, GenerationMode.NEGATIVE, 150)
    assert any(400 <= s < 500 for _, s in seen)


@pytest.mark.parametrize("label,body", [
    ("POST /v1/completions", {"prompt": "hi", "stream": True}),
    ("POST /v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                   "stream": True}),
    ("POST /api/generate", {"prompt": "hi"}),
])
def test_streams_have_the_documented_content_type(server, label, body):
    """The seeded fuzz need not draw a stream: one of each, through the same checks."""
    url, schema = server
    op = next(op for op in operations(schema) if op.label == label)
    case = op.Case(body=body)
    response = case.call(base_url=url, timeout=30)
    assert response.headers["content-type"][0].startswith("text/event-stream")
    judge(GenerationMode.POSITIVE, label, case, response)
