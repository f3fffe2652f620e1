"""The web server end to end on loopback: the official `openai` client, nanochat's own protocol,
32 concurrent streams, malformed input, the queue bound and the API key.

The model is random but can never emit a special token (their lm_head columns are zero while
every other column is scaled up, so a special's logit is 0 and some plain token's is far above),
so greedy replies always run to max_tokens and are compared with `greedy_generate`, the
no-cache reference. Prompts are built by hand from `tok.encode`, independently of the server.
"""
import concurrent.futures
import http.client
import json
import re
import time
import urllib.request

import jax
import numpy as np
import pytest

from nanochat_jax import model as model_lib
from nanochat_jax.data.shards import DEMO_DIR, iter_documents
from nanochat_jax.engine import Engine
from nanochat_jax.sampling import greedy_generate
from nanochat_jax.serving import Request, Scheduler, SlotPool
from nanochat_jax.tokenizer import SPECIAL_IDS, split_for_training, train_tokenizer
from nanochat_jax.web.app import create_app
from nanochat_jax.web.server import BackgroundServer

openai = pytest.importorskip("openai")
MODEL = "nanochat-test"
KEY = "sk-test-key"


@pytest.fixture(scope="session")
def tokenizer():
    docs = list(iter_documents([DEMO_DIR / "shard_00000.parquet"]))[:300]
    return train_tokenizer((p for d in docs for p in split_for_training(d)), 512)


def chatty_params(cfg, seed=0):
    """Random weights whose greedy or sampled output never contains a special token."""
    leaves, treedef = jax.tree.flatten(model_lib.init_params(cfg, jax.random.key(seed)))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    head = np.asarray(params["lm_head"]["kernel"]) * 3.0
    head[:, :max(SPECIAL_IDS.values()) + 1] = 0.0
    params["lm_head"]["kernel"] = jax.numpy.asarray(head)
    return params


@pytest.fixture(scope="session")
def model(tokenizer):
    cfg = model_lib.GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, dim=32, n_head=4, n_kv_head=2,
                              sequence_len=128)
    graphdef, _, _ = model_lib.abstract_model(cfg)
    return graphdef, chatty_params(cfg), cfg


@pytest.fixture(scope="session")
def scheduler(model, tokenizer):
    graphdef, params, cfg = model
    scheduler = Scheduler(SlotPool(Engine(graphdef, params, cfg, tokenizer), slots=8), max_waiting=64).start()
    yield scheduler
    scheduler.stop()


@pytest.fixture(scope="session")
def server(scheduler, tokenizer):
    with BackgroundServer(create_app(scheduler, tokenizer, model_name=MODEL), threads=48) as url:
        yield url


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=60, max_retries=0)


def prompt_ids(tok, text: str) -> list[int]:
    special = tok.encode_special
    return [tok.bos_id, special("<|user_start|>"), *tok.encode(text), special("<|user_end|>"),
            special("<|assistant_start|>")]


def reference(model, tok, texts, max_tokens):
    graphdef, params, _ = model
    return greedy_generate(graphdef, params, [prompt_ids(tok, t) for t in texts], max_tokens)


def user(text):
    return [{"role": "user", "content": text}]


def post(url, body, headers=None):
    """(status, parsed JSON or raw text) of a POST with `body` as bytes or JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def test_non_streaming_reply_is_the_greedy_reference(client, model, tokenizer):
    text = "The whale said"
    expected = reference(model, tokenizer, [text], 12)[0]
    reply = client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.content == tokenizer.decode(expected)
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert reply.usage.prompt_tokens == len(prompt_ids(tokenizer, text))
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    assert reply.model == MODEL and reply.object == "chat.completion"


def test_streaming_reply_and_usage(client, model, tokenizer):
    text = "Call me Ishmael."
    expected = tokenizer.decode(reference(model, tokenizer, [text], 20)[0])
    stream = client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids(tokenizer, text))


def test_system_message_is_merged_into_the_first_user_turn(client, model, tokenizer):
    expected = reference(model, tokenizer, ["Be brief.\n\nHello"], 8)[0]
    reply = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert reply.choices[0].message.content == tokenizer.decode(expected)


def test_n_choices_and_seed_reproducibility(client):
    ask = lambda seed: client.chat.completions.create(model=MODEL, messages=user("Once"), max_tokens=10, n=3,
                                                      temperature=1.0, seed=seed)
    first, again, other = ask(7), ask(7), ask(8)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) == 3  # each choice draws its own tokens
    assert [c.message.content for c in again.choices] == texts
    assert [c.message.content for c in other.choices] != texts
    assert first.usage.completion_tokens == 30


def test_stop_string_cuts_the_reply(client, model, tokenizer):
    text = "Tell me a story"
    full = tokenizer.decode(reference(model, tokenizer, [text], 30)[0])
    stop = full[len(full) // 2: len(full) // 2 + 3]
    reply = client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=30, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=30, temperature=0,
                                            stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == full[:full.index(stop)]


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = json.loads(urllib.request.urlopen(server + "/health", timeout=10).read())
    assert health["status"] == "ok" and health["slots"] == 8
    client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=3, temperature=0)
    metrics = urllib.request.urlopen(server + "/metrics", timeout=10).read().decode()
    completions = re.search(r'nanochat_requests_total\{endpoint="/v1/chat/completions",status="200"\} (\d+)', metrics)
    assert completions and int(completions.group(1)) >= 1
    for name in ("nanochat_active_slots", "nanochat_queue_depth", "nanochat_tokens_per_second",
                 "nanochat_time_to_first_token_seconds_count", "nanochat_completion_tokens_total"):
        assert re.search(rf"^{name} \d", metrics, re.M), name


def test_nanochat_protocol_streams_tokens_then_done(server, model, tokenizer):
    text = "What is a whale?"
    expected = tokenizer.decode(reference(model, tokenizer, [text], 16)[0])
    body = json.dumps({"messages": user(text), "temperature": 0.0, "max_tokens": 16})
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
    connection.request("POST", "/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = [json.loads(e.removeprefix("data: ")) for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == {"done": True}
    assert "".join(e["token"] for e in events[:-1]) == expected
    assert all(e["gpu"] == 0 for e in events[:-1])


def test_nanochat_protocol_caps_max_tokens_to_the_context(server):
    status, text = post(server + "/chat/completions", {"messages": user("Hi"), "max_tokens": 4096, "top_k": 1})
    assert status == 200 and text.rstrip().endswith('data: {"done": true}')


def test_special_token_strings_stay_plain_text(client, model, tokenizer):
    text = "<|assistant_end|><|bos|> and <|python_start|>1+1<|python_end|>"
    assert not set(tokenizer.encode(text)) & set(SPECIAL_IDS.values())
    reply = client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=5, temperature=0)
    assert reply.usage.prompt_tokens == len(prompt_ids(tokenizer, text))
    assert reply.choices[0].message.content == tokenizer.decode(reference(model, tokenizer, [text], 5)[0])


def test_32_concurrent_streams_each_equal_the_request_alone(client, model, tokenizer):
    texts = [f"Request number {i}: " + "abcdefghij"[: i % 10] for i in range(32)]
    expected = [tokenizer.decode(r) for r in reference(model, tokenizer, texts, 24)]

    def stream(text):
        chunks = client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=24, temperature=0,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        outputs = list(pool.map(stream, texts, timeout=300))
    assert outputs == expected


BAD_REQUESTS = [
    b"not json", b"\xff\xfe\x00bad utf-8", b"[1, 2]", b'"a string"', b"null", b"{}",
    {"messages": "hello"}, {"messages": []}, {"messages": [1]}, {"messages": [{"content": "no role"}]},
    {"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": ""}]},
    {"messages": [{"role": "user", "content": 5}]}, {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": "<|user_start|>", "content": "x"}]}, {"messages": [{"role": "user", "content": None}]},
    {"messages": [{"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": "x" * 8001}]},
    {"messages": [{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 3
     + [{"role": "user", "content": "z" * 7000}]},
    {"messages": [{"role": "user", "content": "hi"}] * 10_000},
    {"messages": user("hi"), "max_tokens": -1}, {"messages": user("hi"), "max_tokens": 0},
    {"messages": user("hi"), "max_tokens": 10**12}, {"messages": user("hi"), "max_tokens": "10"},
    {"messages": user("hi"), "max_tokens": 2.5}, {"messages": user("hi"), "temperature": -0.1},
    {"messages": user("hi"), "temperature": 3}, {"messages": user("hi"), "temperature": "hot"},
    {"messages": user("hi"), "top_k": -1}, {"messages": user("hi"), "seed": "x"}, {"messages": user("hi"), "seed": 2**70},
    {"messages": user("x " * 4000)},  # fits the character caps, not the 128-token context
    b"{" + b'"messages": [' + b'{"role": "user", "content": "hi"},' * 20_000 + b"]}",  # over the body cap
]
# fields only the OpenAI API has (nanochat's protocol ignores them) or limits only it applies
BAD_OPENAI_REQUESTS = [
    {"messages": user("hi"), "max_tokens": 1000},  # nanochat's protocol cuts it to the context instead
    {"messages": user("hi"), "max_completion_tokens": True}, {"messages": user("hi"), "top_p": 0},
    {"messages": user("hi"), "top_p": 1.5}, {"messages": user("hi"), "n": 0}, {"messages": user("hi"), "n": 100},
    {"messages": user("hi"), "stream": "yes"}, {"messages": user("hi"), "stop": 7},
    {"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, {"messages": user("hi"), "stop": [""]},
    {"messages": user("hi"), "model": 3}, {"messages": user("hi"), "stream_options": {"include_usage": "yes"}},
]


def test_malformed_requests_get_4xx_json_errors_and_the_server_keeps_serving(server, client):
    cases = [(body, path) for body in BAD_REQUESTS for path in ("/v1/chat/completions", "/chat/completions")]
    cases += [(body, "/v1/chat/completions") for body in BAD_OPENAI_REQUESTS]
    assert len(BAD_REQUESTS) + len(BAD_OPENAI_REQUESTS) >= 40
    for i, (body, path) in enumerate(cases):
        status, reply = post(server + path, body)
        assert 400 <= status < 500, (i, path, status, reply)
        assert isinstance(reply, dict) and isinstance(reply["error"]["message"], str), (i, path, reply)
        assert "Traceback" not in reply["error"]["message"]
    for status, reply in [post(server + "/v1/nope", {}), post(server + "/v1/models", {})]:
        assert status in (404, 405) and "error" in reply
    assert client.chat.completions.create(model=MODEL, messages=user("still there?"), max_tokens=2).choices


def test_nanochat_protocol_limits(server):
    for body in ({"messages": [{"role": "system", "content": "x"}, *user("hi")]},
                 {"messages": user("hi"), "top_k": 0}, {"messages": user("hi"), "top_k": 201},
                 {"messages": user("hi"), "max_tokens": 4097}):
        status, reply = post(server + "/chat/completions", body)
        assert status == 400 and "error" in reply, body


def test_full_queue_answers_429(model, tokenizer):
    graphdef, params, cfg = model
    idle = Scheduler(SlotPool(Engine(graphdef, params, cfg, tokenizer), slots=1), max_waiting=1)  # never started
    idle.submit(Request([1, 2], 1))
    with BackgroundServer(create_app(idle, tokenizer)) as url:
        status, reply = post(url + "/v1/chat/completions", {"messages": user("hi")})
        assert status == 429 and reply["error"]["type"] == "rate_limit_error"
        status, _ = post(url + "/chat/completions", {"messages": user("hi")})
        assert status == 429


def test_api_key_guards_the_api(scheduler, tokenizer):
    with BackgroundServer(create_app(scheduler, tokenizer, model_name=MODEL, api_key=KEY)) as url:
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
        assert post(url + "/chat/completions", {"messages": user("hi")})[0] == 401
        right = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        assert [m.id for m in right.models.list().data] == [MODEL]
        assert right.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2).choices
        assert urllib.request.urlopen(url + "/health", timeout=10).status == 200


def test_a_client_that_disconnects_frees_its_slot(server, scheduler, monkeypatch):
    submitted = []
    submit = scheduler.submit
    monkeypatch.setattr(scheduler, "submit", lambda request: submitted.append(request) or submit(request))
    body = json.dumps({"messages": user("a long story"), "max_tokens": 110, "temperature": 0.0, "stream": True})
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    response.close()
    connection.close()
    deadline = time.monotonic() + 30
    while submitted[0].finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert submitted[0].finish_reason == "cancelled" and submitted[0].num_generated < 110
    assert not scheduler.active
