"""Continuous batching without HTTP: per-row sampling against NumPy, slots against the no-cache
greedy reference, per-slot seeds and tools, scheduling order, cancellation, the queue bound, and
UTF-8 and stop-string streaming."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import model as model_lib
from nanochat_jax.engine import Engine
from nanochat_jax.sampling import greedy_generate
from nanochat_jax.serving import QueueFull, Request, Sampling, Scheduler, SlotPool, StopMatcher, StreamingDecoder
from nanochat_jax.serving.slots import sample_rows
from nanochat_jax.tokenizer import train_tokenizer
from test_engine import StubTokenizer, bigram_engine, random_params  # random and scripted models

CFG = model_lib.GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4, n_kv_head=2, sequence_len=64)
SLOTS = 2  # one slot count throughout, so the decode step compiles once
PROMPTS = [[7], [3, 9, 27, 1, 40], list(range(2, 15)), [(5 * i) % 64 for i in range(20)], [11, 12], [60] * 9]


@pytest.fixture(scope="module")
def model():
    graphdef, _, _ = model_lib.abstract_model(CFG)
    params = random_params(CFG)
    return graphdef, params, Engine(graphdef, params, CFG, StubTokenizer(), buckets=(16, 32))


def run(scheduler, requests, timeout=120):
    """Each request's tokens, submitted together and read concurrently."""
    results = [None] * len(requests)

    def read(i):
        results[i] = list(requests[i].tokens(timeout=timeout))
    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(requests))]
    for r in requests:
        scheduler.submit(r)
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


# ---- sampling ---------------------------------------------------------------------------------

def test_each_row_samples_with_its_own_parameters():
    """Empirical frequencies over many keys against softmax(logits / T) restricted to the top k,
    then to the smallest head of that renormalised distribution holding top_p (as Hugging Face and
    vLLM apply them), computed in NumPy; greedy rows are the argmax."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    rows = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.5, 2, 1.0), (2.0, 0, 0.7), (1.0, 1, 1.0), (1.0, 3, 0.8)]

    def expected(temperature, top_k, top_p):
        if temperature == 0:
            return np.eye(5)[np.argmax(logits)]
        order = np.argsort(-logits)[:top_k or 5]
        p = np.zeros(5)
        p[order] = np.exp(logits[order] / temperature)
        p /= p.sum()
        keep = np.zeros(5, bool)
        mass = 0.0
        for i in order:  # take tokens in order until top_p is reached
            if mass >= top_p:
                break
            keep[i], mass = True, mass + p[i]
        return np.where(keep, p, 0) / p[keep].sum()
    draws = 20000
    temperature, top_k, top_p = (np.array(c) for c in zip(*rows))
    sample = jax.jit(jax.vmap(lambda key: sample_rows(jnp.broadcast_to(logits, (len(rows), 5)),
                                                      jax.random.split(key, len(rows)), temperature.astype(np.float32),
                                                      top_k.astype(np.int32), top_p.astype(np.float32))))
    tokens = np.asarray(sample(jax.random.split(jax.random.key(0), draws)))  # (draws, rows)
    for row, params in enumerate(rows):
        frequencies = np.bincount(tokens[:, row], minlength=5) / draws
        np.testing.assert_allclose(frequencies, expected(*params), atol=0.015, err_msg=str(params))


# ---- slots against the references ------------------------------------------------------------

def test_greedy_slots_equal_the_no_cache_reference_as_requests_join_and_leave(model):
    """Six prompts with different lengths and budgets through 2 slots: requests wait, join
    running batches and leave them, and each still gets exactly its own greedy continuation."""
    graphdef, params, engine = model
    budgets = [12, 5, 20, 3, 9, 15]
    scheduler = Scheduler(SlotPool(engine, slots=SLOTS)).start()
    try:
        results = run(scheduler, [Request(p, n, Sampling(temperature=0.0)) for p, n in zip(PROMPTS, budgets)])
    finally:
        scheduler.stop()
    expected = greedy_generate(graphdef, params, PROMPTS, max(budgets))
    assert results == [e[:n] for e, n in zip(expected, budgets)]


def test_a_seeded_request_draws_the_same_tokens_whatever_runs_beside_it(model):
    *_, engine = model
    scheduler = Scheduler(SlotPool(engine, slots=SLOTS)).start()
    try:
        sampling = Sampling(temperature=1.0, seed=11)
        alone = run(scheduler, [Request(PROMPTS[2], 16, sampling)])[0]
        crowd = [Request(p, n, Sampling(temperature=1.0, top_k=5, top_p=0.9, seed=i))  # these need the sort
                 for i, (p, n) in enumerate(zip(PROMPTS, (3, 16, 9)))]
        together = run(scheduler, [crowd[0], Request(PROMPTS[2], 16, sampling), *crowd[1:]])[1]
        other_stream = run(scheduler, [Request(PROMPTS[2], 16, Sampling(1.0, seed=11, stream=1))])[0]
    finally:
        scheduler.stop()
    assert together == alone
    assert other_stream != alone


def test_a_sampled_request_draws_step_t_with_key_seed_stream_t(model):
    """Against the no-cache model: token t is categorical(key(seed, stream, t), logits / T), the
    key scheme the engine documents (`row_keys`), so draws never depend on the batch."""
    graphdef, params, engine = model
    prompt, seed, stream, temperature = PROMPTS[1], 5, 2, 0.8
    scheduler = Scheduler(SlotPool(engine, slots=SLOTS)).start()
    try:
        got = run(scheduler, [Request(prompt, 12, Sampling(temperature, seed=seed, stream=stream)),
                              Request(PROMPTS[3], 12, Sampling(1.0, top_k=3, seed=1))])[0]
    finally:
        scheduler.stop()
    forward = jax.jit(model_lib.forward, static_argnums=0)
    tokens = list(prompt)
    for t in range(12):  # padded to one width, so forward compiles once; causal: padding is never seen
        logits = forward(graphdef, params, jnp.array([tokens + [0] * (32 - len(tokens))]))[0, len(tokens) - 1]
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), t)
        tokens.append(int(jax.random.categorical(key, logits / temperature)))
    assert got == tokens[len(prompt):]


def test_new_sampling_values_and_slots_never_recompile(model):
    *_, engine = model
    pool = SlotPool(engine, slots=SLOTS)
    compiled = lambda: (engine.insert_rows._cache_size(), pool._set_row._cache_size(), pool._sample._cache_size(),
                        engine.decode_step._cache_size())
    for i, prompt in enumerate([[1, 2, 3], [4] * 10, [5, 6], [7] * 14]):  # all in the 16 bucket
        pool.admit(i % 2, prompt, Sampling(temperature=0.3 * i, top_k=i, top_p=1 - 0.1 * i, seed=i))
        pool.step(np.array([1, 2]), np.array([len(prompt), 3]), np.array([1, 5]))
        if i == 0:
            first = compiled()
    assert compiled() == first
    pool.admit(0, list(range(1, 40)), Sampling())  # another prompt bucket: only the prefill and insert compile
    assert compiled()[1:3] == first[1:3]


# ---- stopping and the calculator per slot, with a scripted bigram model -----------------------

def test_calculator_and_stop_tokens_work_per_slot():
    tok = train_tokenizer(["what is 1+3? it is 4.", "the quick brown fox jumps", "a b c d e f g"] * 20, 300)
    special = tok.encode_special
    start, end = special("<|assistant_start|>"), special("<|assistant_end|>")
    py_start, py_end, out_start, out_end = (special(f"<|{n}|>") for n in ("python_start", "python_end",
                                                                           "output_start", "output_end"))
    one, plus, three = tok.encode("1+3")
    fox = tok.encode("fox")[-1]
    a, b = tok.encode("a")[-1], tok.encode("b")[-1]
    script = {start: [py_start], py_start: [one], one: [plus], plus: [three], three: [py_end], out_end: [end],
              fox: [a], a: [b], b: [tok.bos_id]}
    scheduler = Scheduler(SlotPool(bigram_engine(tok, script, n_layer=1, buckets=(16,)), slots=2)).start()
    try:
        calc, plain = Request([tok.bos_id, *tok.encode("hi"), start], 20), Request([tok.bos_id, fox], 20)
        calc_tokens, plain_tokens = run(scheduler, [calc, plain])
    finally:
        scheduler.stop()
    assert tok.decode(calc_tokens) == "<|python_start|>1+3<|python_end|><|output_start|>4<|output_end|>"
    assert plain_tokens == [a, b]
    assert (calc.finish_reason, plain.finish_reason) == ("stop", "stop")
    assert (calc.num_generated, plain.num_generated) == (len(calc_tokens) + 1, 3)  # the stop token counts


# ---- scheduling ---------------------------------------------------------------------------------

def test_short_requests_finish_before_a_long_one_started_earlier(model):
    *_, engine = model
    scheduler = Scheduler(SlotPool(engine, slots=SLOTS)).start()
    finished = []

    def read(name, request):
        list(request.tokens(timeout=120))
        finished.append(name)
    try:
        long = scheduler.submit(Request(PROMPTS[1], 50, Sampling(temperature=0.0)))
        threads = [threading.Thread(target=read, args=("long", long))]
        threads[0].start()
        for i in range(3):
            short = scheduler.submit(Request(PROMPTS[i], 4, Sampling(temperature=0.0)))
            threads.append(threading.Thread(target=read, args=(f"short{i}", short)))
            threads[-1].start()
        for t in threads:
            t.join(120)
    finally:
        scheduler.stop()
    assert finished[-1] == "long" and sorted(finished[:3]) == ["short0", "short1", "short2"]


def test_cancelling_frees_the_slot_for_a_waiting_request(model):
    *_, engine = model
    scheduler = Scheduler(SlotPool(engine, slots=SLOTS)).start()
    try:
        hog = scheduler.submit(Request(PROMPTS[0], 60, Sampling(temperature=0.0)))
        other = scheduler.submit(Request(PROMPTS[2], 50, Sampling(temperature=0.0)))
        waiting = scheduler.submit(Request(PROMPTS[1], 3, Sampling(temperature=0.0)))
        next(hog.tokens(timeout=60))
        hog.cancel()
        assert len(list(waiting.tokens(timeout=60))) == 3
        assert waiting.finish_reason == "length"
        assert hog.finish_reason == "cancelled" and hog.num_generated < 60
        assert other.finish_reason is None  # still generating: the freed slot went to the waiting request
        other.cancel()
    finally:
        scheduler.stop()
    assert not scheduler.active


def test_the_waiting_queue_is_bounded(model):
    *_, engine = model
    scheduler = Scheduler(SlotPool(engine, slots=SLOTS), max_waiting=2)  # not started: nothing leaves the queue
    for _ in range(2):
        scheduler.submit(Request([1, 2], 1))
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        scheduler.submit(Request([1, 2], 1))
    with pytest.raises(ValueError, match="context of 64"):
        scheduler.submit(Request([1] * 60, 5))


# ---- text streaming -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_tokenizer():
    return train_tokenizer(["plain ascii words only, nothing else"] * 50, 300)


def test_streamed_text_never_splits_a_character(byte_tokenizer):
    text = "héllo 日本語 🎉 ok ∑"
    ids = byte_tokenizer.encode(text)
    assert len(ids) > len(text)  # the non-ASCII characters are spelled in byte tokens
    decoder = StreamingDecoder(byte_tokenizer)
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("chunks, stops, sent, stopped", [
    (["Hello wor", "ld! Bye"], ["world"], "Hello ", True),
    (["ab", "c", "d"], ["cd", "x"], "ab", True),
    (["a<", "b>", "c"], ["<|"], "a<b>c", False),
    (["keep going"], [], "keep going", False),
])
def test_stop_strings_cut_the_stream_and_never_leak(chunks, stops, sent, stopped):
    matcher = StopMatcher(stops)
    out = [matcher.push(c) for c in chunks] + [matcher.flush()]
    assert "".join(out) == sent and matcher.stopped == stopped
    assert not any(s in "".join(out) for s in stops if s)
