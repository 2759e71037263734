"""POST /v1/chat/completions through the official openai client (plain, streamed, logprobs) against
model.data.chat's template and model.inference.sampling.generate; end of turn; every bad chat
request; and the protocol every endpoint shares: one validation path, seeds, the tokenizer
endpoints, /openapi.json with each body, /docs offline, 405 with Allow."""

from __future__ import annotations

import asyncio
import copy
import math
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx")
openai = pytest.importorskip("openai", reason="the API tests use the official openai client")

from serve_server import load, running_server, train_tiny  # noqa: E402

from model import GPT, Config, GPTConfig  # noqa: E402
from model.config import DataConfig  # noqa: E402
from model.data.chat import ROLE_ALIASES, ROLES, TURN_STOPS, render_chat  # noqa: E402
from model.data.tokenizer import train_tokenizer  # noqa: E402
from model.inference.sampling import generate  # noqa: E402
from model.serve.http_errors import APIError  # noqa: E402
from model.serve.prompts import chat_prompt  # noqa: E402
from model.serve.state import Served  # noqa: E402
from model.weights.checkpoint import save_checkpoint  # noqa: E402
from model.weights.loading import Pretrained, load_model  # noqa: E402

NAME = "tiny"
LIMIT = 200
USER = [{"role": "user", "content": "to be or"}]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return load(train_tiny(tmp_path_factory.mktemp("chat")))


@pytest.fixture(scope="module")
def server(pretrained):
    with running_server(pretrained, NAME, max_tokens=LIMIT) as (url, app):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=60)


def reference(pretrained, messages, n_tokens, **kw) -> list:
    """generate's steps over the template's prompt, with the stop string a base model needs."""
    ids = render_chat(messages, pretrained.tokenizer)
    return list(generate(pretrained.model, pretrained.tokenizer, ids, max_new_tokens=n_tokens,
                         stop=list(TURN_STOPS), **kw))


def test_plain_reply_is_generate_over_the_template(client, pretrained):
    resp = client.chat.completions.create(model=NAME, messages=USER, max_tokens=20,
                                          temperature=0)
    steps = reference(pretrained, USER, 20, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(s.delta for s in steps)
    assert choice.finish_reason == "length" and resp.object == "chat.completion"
    assert resp.usage.prompt_tokens == len(render_chat(USER, pretrained.tokenizer))
    assert resp.usage.completion_tokens == 20
    seeded = dict(model=NAME, messages=USER, max_completion_tokens=12, temperature=0.9,
                  top_p=0.9, seed=4, n=2)
    first = client.chat.completions.create(**seeded)
    expected = ["", ""]
    for step in reference(pretrained, USER, 12, temperature=0.9, top_p=0.9, seed=4,
                          num_samples=2):
        expected[step.sample] += step.delta
    assert [c.message.content for c in first.choices] == expected
    again = client.chat.completions.create(**seeded)
    assert [c.message.content for c in again.choices] == expected


def test_streamed_chunks_join_to_the_plain_reply(client):
    kw = dict(model=NAME, messages=USER, max_tokens=15, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_logprobs_in_the_chat_shape(client, pretrained):
    kw = dict(model=NAME, messages=USER, max_tokens=8, temperature=0, logprobs=True,
              top_logprobs=3)
    resp = client.chat.completions.create(**kw)
    content = resp.choices[0].logprobs.content
    steps = reference(pretrained, USER, 8, temperature=0, show_top=3)
    assert "".join(e.token for e in content) == resp.choices[0].message.content
    for entry, step in zip(content, steps, strict=True):
        assert entry.logprob == pytest.approx(math.log(step.prob), abs=1e-5)
        assert bytes(entry.bytes) == entry.token.encode("utf-8")
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest is chosen
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True)
    streamed = [e for c in client.chat.completions.create(stream=True, **kw) if c.choices
                and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model=NAME, messages=USER, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_the_end_of_turn_token_ends_the_reply_with_stop(pretrained):
    """A model that ends its turn at once (its end-of-text logit raised): finish_reason
    "stop", and the end-of-text token is not part of the reply."""
    ending = copy.deepcopy(pretrained.model)
    eot = pretrained.tokenizer.eot_id

    def end_turn(module, args, output):
        output[0][..., eot] += 100.0
        return output

    ending.register_forward_hook(end_turn)
    chatty = Pretrained(model=ending, tokenizer=pretrained.tokenizer, kind="smallgpt",
                        path=pretrained.path, description="ends turns")
    with running_server(chatty, NAME, max_tokens=LIMIT) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        resp = client.chat.completions.create(model=NAME, messages=USER, max_tokens=50,
                                              logprobs=True)
        assert resp.choices[0].finish_reason == "stop"
        assert resp.choices[0].message.content == "" and resp.choices[0].logprobs.content == []
        assert resp.usage.completion_tokens == 1
        chunks = list(client.chat.completions.create(model=NAME, messages=USER, max_tokens=50,
                                                     stream=True))
        assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"



def test_a_reply_ends_at_the_templates_next_user_turn_even_when_the_model_writes_one(pretrained):
    """A stand-in model that writes a reply, then starts the next user turn itself: the reply
    ends before "\\n\\nUser:" (the template's stop), with finish_reason "stop"."""
    scripted = copy.deepcopy(pretrained.model)
    script = pretrained.tokenizer.encode("to be\n\nUser: or not")
    calls = []

    def follow_script(module, args, output):
        step = min(len(calls), len(script) - 1)
        calls.append(step)
        output[0][:, -1, script[step]] += 1000.0  # the next token of the script, certainly
        return output

    scripted.register_forward_hook(follow_script)
    chatty = Pretrained(model=scripted, tokenizer=pretrained.tokenizer, kind="smallgpt",
                        path=pretrained.path, description="scripted")
    with running_server(chatty, NAME, max_tokens=LIMIT) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        resp = client.chat.completions.create(model=NAME, messages=USER, max_tokens=30,
                                              temperature=0)
    assert resp.choices[0].message.content == "to be"
    assert resp.choices[0].finish_reason == "stop"

def test_a_stop_string_ends_the_reply_with_stop(client, pretrained):
    steps = reference(pretrained, USER, 30, temperature=0)
    text = "".join(s.delta for s in steps)
    stop = text[3:5]  # two characters the greedy reply writes
    resp = client.chat.completions.create(model=NAME, messages=USER, max_tokens=30,
                                          temperature=0, stop=stop)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == text[:text.index(stop)]


def test_models_say_whether_the_model_was_chat_trained(client, pretrained, tmp_path):
    """A base model says chat_trained false (chat still answers, as above); a checkpoint whose
    run trained on chat data (data.format "chat") says true, in /v1/models and /api/info."""
    assert client.models.retrieve(NAME).model_extra["chat_trained"] is False
    assert not pretrained.chat_trained
    tokenizer = train_tokenizer("char", ["abcdefghijklmnopqrstuvwxyz :\nSUA"])
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2,
                       n_embd=16)
    save_checkpoint(tmp_path / "chat" / "latest", GPT(config),
                    Config(model=config, data=DataConfig(format="chat"), name="t"),
                    tokenizer.spec())
    chatty = load_model(str(tmp_path / "chat"))
    with running_server(chatty, "chatty") as (url, _):
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["chat_trained"] is True
        assert httpx.get(f"{url}/api/info").json()["chat_trained"] is True
        reply = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": USER, "max_tokens": 3}).json()
        assert reply["object"] == "chat.completion"


BAD = [  # (body, status, param)
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "bot", "content": "to"}]}, 400, "messages[0].role"),
    ({"messages": [{"content": "to"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "ROMEO"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "to be " * 10}]}, 400, "messages"),
    ({"messages": USER, "model": "gpt-4"}, 404, "model"),
    ({"messages": USER, "temperature": 3}, 400, "temperature"),
    ({"messages": USER, "top_p": 0}, 400, "top_p"),
    ({"messages": USER, "n": 0}, 400, "n"),
    ({"messages": USER, "max_tokens": LIMIT + 1}, 400, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ({"messages": USER, "logprobs": "yes"}, 400, "logprobs"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"messages": USER, "stream": 1}, 400, "stream"),
    ({"messages": USER, "stop": ""}, 400, "stop"),
    ({"messages": USER, "seed": 1.5}, 400, "seed"),
    ({"messages": USER, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"messages": USER, "logit_bias": {"1": 5}}, 400, "logit_bias"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_chat_requests_get_a_clear_4xx(server, body, status, param):
    r = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"], error
    assert httpx.post(f"{server}/v1/chat/completions",
                      json={"messages": USER, "max_tokens": 1}).status_code == 200


def test_the_schema_lists_the_roles_the_chat_template_reads(server):
    """The wire schema's roles come from model.data.chat: each role, then its aliases."""
    schema = httpx.get(f"{server}/openapi.json").json()
    roles = schema["components"]["schemas"]["Message"]["properties"]["role"]["enum"]
    assert roles == ["system", "developer", "user", "assistant"]
    assert set(roles) == set(ROLES) | set(ROLE_ALIASES)


def test_the_chat_template_reads_the_request_messages_and_names_a_bad_field(pretrained):
    """model.data.chat reads the request's messages as they are (objects with role and content,
    text parts with type and text, developer as system); a message it rejects is a 400 whose
    param is the field it names, deeper than 'messages'."""
    served = Served(model=pretrained.model, tokenizer=pretrained.tokenizer, model_id=NAME,
                    description="")
    parts = [SimpleNamespace(type="text", text="t"), SimpleNamespace(type="text", text="o")]
    messages = [SimpleNamespace(role="developer", content="b"),
                SimpleNamespace(role="user", content=parts)]
    ids = asyncio.run(chat_prompt(served, messages))
    assert ids == render_chat([{"role": "system", "content": "b"},
                               {"role": "user", "content": "to"}], pretrained.tokenizer)
    bad = [messages[0], SimpleNamespace(role="user", content=[SimpleNamespace(type="image")])]
    with pytest.raises(APIError) as err:
        asyncio.run(chat_prompt(served, bad))
    assert err.value.status == 400 and err.value.param == "messages[1].content[0]"
    assert err.value.message.startswith("messages[1].content[0]: only text parts")


def test_the_openai_client_raises_the_servers_message(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=USER, temperature=5)
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=USER)


def test_one_validation_path_for_completions_chat_and_page(server):
    """The same bad value gets the same message from the three generating endpoints."""
    url = server
    bodies = {"/v1/completions": {"prompt": "to"}, "/v1/chat/completions": {"messages": USER},
              "/api/generate": {"prompt": "to"}}
    for field, value in (("temperature", 2.5), ("top_p", 1.5), ("seed", 2.5),
                         ("max_tokens", LIMIT + 1), ("top_k", 0)):
        messages = set()
        for path, body in bodies.items():
            r = httpx.post(url + path, json={**body, field: value})
            assert r.status_code == 400, (path, field, r.text)
            messages.add(r.json()["error"]["message"])
        assert len(messages) == 1, messages


def test_any_integer_is_a_seed_taken_modulo_2_64(server, pretrained):
    """torch's seeds are 64 bits: a wider one is reduced, never a late error on the engine
    thread, the same way on every endpoint."""
    def completion(seed: int) -> str:
        return httpx.post(f"{server}/v1/completions", json={
            "prompt": "to be", "max_tokens": 10, "seed": seed}).json()["choices"][0]["text"]

    def reference_text(seed: int) -> str:
        return "".join(s.delta for s in generate(pretrained.model, pretrained.tokenizer, "to be",
                                                 max_new_tokens=10, seed=seed))

    assert completion(2**64 + 5) == completion(2**70 + 5) == reference_text(5)
    assert completion(-(2**64) - 1) == reference_text(2**64 - 1)
    chat = httpx.post(f"{server}/v1/chat/completions", json={
        "messages": USER, "max_tokens": 10, "seed": 2**64 + 3}).json()
    assert chat["choices"][0]["message"]["content"] == "".join(
        s.delta for s in reference(pretrained, USER, 10, seed=3))


def test_tokenize_detokenize_round_trip(server, pretrained):
    url = server
    text = "whether the nobler mind\nto suffer"
    tok = httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert tok["tokens"] == pretrained.tokenizer.encode(text) and tok["count"] == len(text)
    back = httpx.post(f"{url}/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back == {"prompt": text}
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["tokenizer_name"] == "char"
    assert info["vocab_size"] == pretrained.tokenizer.vocab_size


def test_openapi_documents_every_body_and_its_errors(server):
    schema = httpx.get(f"{server}/openapi.json").json()
    posts = {path: ops["post"] for path, ops in schema["paths"].items() if "post" in ops}
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
            "/api/generate", "/api/distribution", "/api/attention"} <= set(posts)
    components = schema["components"]["schemas"]
    for path, op in posts.items():
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.split("/")[-1] in components, path
        assert "400" in op["responses"] and "422" not in op["responses"], path
    chat = components["ChatCompletionRequest"]
    assert chat["required"] == ["messages"]
    assert {"max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
            "stream", "stream_options", "logprobs", "top_logprobs"} <= set(chat["properties"])
    max_tokens = chat["properties"]["max_tokens"]["anyOf"][0]
    assert max_tokens["maximum"] == LIMIT  # the served model's limit, as check() applies it
    assert components["CompletionRequest"]["properties"]["model"]["anyOf"][0]["enum"] == [NAME]


def test_docs_page_works_offline(server):
    page = httpx.get(f"{server}/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs-assets/{asset}" in page.text and "cdn" not in page.text.lower()
        assert httpx.get(f"{server}/docs-assets/{asset}").status_code == 200


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/v1/chat/completions", "POST"),
    ("PUT", "/v1/completions", "POST"),
    ("DELETE", "/v1/models", "GET"),
    ("POST", "/api/info", "GET"),
])
def test_a_wrong_method_is_a_405_with_allow(server, method, path, allow):
    r = httpx.request(method, server + path)
    assert r.status_code == 405
    assert allow in r.headers["allow"].split(", ")
    assert r.json()["error"]["code"] == "method_not_allowed" and allow in r.text


def test_a_body_over_the_limit_is_a_413(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b" " * (5 << 20),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

