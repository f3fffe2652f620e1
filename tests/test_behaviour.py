"""Behaviour figures: exact counts from scripted replies (a fake engine, then bigram models through
the real engine), and a random model's figures against each prompt's own token stream."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import model as model_lib
from nanochat_jax.conversation import render_for_completion
from nanochat_jax.engine import Engine
from nanochat_jax.evals import behaviour
from nanochat_jax.tasks import ArithmeticWordProblems, SimpleSpelling
from test_chat_eval import SHARED, random_model
from test_chat_eval import tokenizer as trained_tokenizer  # noqa: F401 (a fixture: 512 tokens of the demo corpus)
from test_conversation import AE, BOS, OE, OS, PE, PS, TOK  # one id per character, specials 1..9
from test_engine import bigram_engine
from test_engine import tokenizer as small_tokenizer  # noqa: F401 (a fixture: 300 tokens)

WORDS = SHARED / "datasets"  # holds words/words3to10.txt


def qa(question, *more):
    """A conversation whose first user turn is `question`, then the assistant and any further turns."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "ref"}]
    for i, content in enumerate(more):
        messages.append({"role": ("user", "assistant")[i % 2], "content": content})
    return {"messages": messages}


# ---- a scripted engine: exact counts -------------------------------------------------------------

BUDGET, CONTEXT = 24, 512


class ScriptedEngine:
    """generate_many as the engine answers greedily: each prompt's scripted reply, cut after the
    first of `stop_tokens` (kept with keep_stop, else dropped) or after `max_tokens`."""

    def __init__(self, replies: dict[tuple, list[int]]):
        self.replies, self.calls = replies, []
        self.cfg, self.tokenizer = types.SimpleNamespace(sequence_len=CONTEXT), TOK
        self.stop_tokens = (AE, BOS)

    def generate_many(self, prompts, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42,
                      max_rows=None, keep_stop=False):
        self.calls.append((len(prompts), max_tokens, temperature))
        results = []
        for prompt in prompts:
            reply = []
            for token in self.replies[tuple(prompt)][:max_tokens]:
                if token in self.stop_tokens:
                    reply += [token] if keep_stop else []
                    break
                reply.append(token)
            results.append(([list(prompt) + reply], [[0] * len(prompt) + [1] * len(reply)]))
        return results


def prompt_of(question: str) -> tuple:
    return tuple(render_for_completion(TOK, qa(question)))


def text(s: str) -> list[int]:
    return TOK.encode(s)


def test_scripted_replies_give_the_hand_counted_figures():
    fits = "f" * (CONTEXT - BUDGET - 4)  # 4 specials around it: the prompt leaves room for BUDGET exactly
    conversation = [qa("c0"), qa("c1"), qa("c2"), qa("c3"), qa("c4", "and then?", "more"), qa(fits), qa(fits + "g")]
    replies = {prompt_of("c0"): text("hello") + [AE],                  # ends
               prompt_of("c1"): text("x" * BUDGET) + [AE],             # the end would be token BUDGET + 1
               prompt_of("c2"): text("x" * (BUDGET - 1)) + [AE],       # ends on the budget's last token
               prompt_of("c3"): text("x") + [BOS, AE],                 # a <|bos|> is not an end
               prompt_of("c4"): text("ok") + [AE],                     # the first turn only is the prompt
               prompt_of(fits): text("x" * BUDGET)}                    # (fits + "g" is too long: no script)
    arithmetic = ArithmeticWordProblems(5, split="test")  # the fifth is past max_problems: no script
    answers = [arithmetic[i]["answer"] for i in range(4)]
    arithmetic_replies = [
        [PS, *text("3*4"), PE, OS, *text("12"), OE, *text(f" #### {answers[0]}"), AE],  # calculator, right
        text(f"#### {answers[1]}") + [AE],                                               # right
        [PS, *text("1+1"), PE, *text("#### 99999"), AE],                                 # calculator, wrong
        text("x" * BUDGET)]                                                              # no end, wrong
    spelling = SimpleSpelling(3, split="test", data_dir=WORDS)
    spelled = [spelling[i]["messages"][-1]["content"] for i in range(3)]  # word:w,o,r,d
    spelling_replies = [text(spelled[0]) + [AE],                                   # right
                        text("nope") + [AE],                                       # wrong
                        text(spelled[2] + "x" * BUDGET)]                           # no end, wrong
    for task, scripted in ((arithmetic, arithmetic_replies), (spelling, spelling_replies)):
        for i, reply in enumerate(scripted):
            replies[tuple(render_for_completion(TOK, task[i]))] = reply

    engine = ScriptedEngine(replies)
    tasks = {"conversation": conversation, behaviour.ARITHMETIC: arithmetic, behaviour.SPELLING: spelling}
    figures = behaviour.behaviour_figures(engine, TOK, tasks, max_problems=4, max_new_tokens=BUDGET, max_rows=2)
    kinds = figures.pop("kinds")
    assert kinds == {
        "conversation": {"prompts": 4, "too_long": 0, "ended": 2, "calculator_calls": 0, "ends_share": 0.5,
                         "calculator_share": 0.0},
        "arithmetic": {"prompts": 4, "too_long": 0, "ended": 3, "calculator_calls": 2, "passed": 2,
                       "ends_share": 0.75, "calculator_share": 0.5, "accuracy": 0.5},
        "spelling": {"prompts": 3, "too_long": 0, "ended": 2, "calculator_calls": 0, "passed": 1,
                     "ends_share": pytest.approx(2 / 3), "calculator_share": 0.0, "accuracy": pytest.approx(1 / 3)}}
    assert {k: v for k, v in figures.items() if k != "seconds"} == {
        "max_new_tokens": BUDGET, "prompts": 11, "ended": 7, "ends_share": pytest.approx(7 / 11),
        "calculator_share": 0.5, "arithmetic_accuracy": 0.5, "spelling_accuracy": pytest.approx(1 / 3)}
    assert {(budget, temperature) for _, budget, temperature in engine.calls} == {(BUDGET, 0.0)}

    figures = behaviour.behaviour_figures(engine, TOK, {"conversation": conversation}, None, BUDGET)
    assert figures["kinds"]["conversation"] == {"prompts": 6, "too_long": 1, "ended": 3, "calculator_calls": 0,
                                                "ends_share": 0.5, "calculator_share": 0.0}
    assert figures["calculator_share"] is figures["arithmetic_accuracy"] is figures["spelling_accuracy"] is None

    headline, table = behaviour.report_items(figures)
    assert headline[f"ends with <|assistant_end|> within {BUDGET} tokens"] == 0.5
    assert "| conversation | 6 | 1 | 0.5000 | 0.0000 | - |" in table


def test_bad_arguments_are_clear_errors():
    engine = ScriptedEngine({})
    with pytest.raises(ValueError, match="max_new_tokens and max_problems must be >= 1"):
        behaviour.behaviour_figures(engine, TOK, {"conversation": [qa("hi")]}, 0)
    with pytest.raises(ValueError, match="needs an assistant message"):
        behaviour.behaviour_figures(engine, TOK, {"conversation": [{"messages": [{"role": "user", "content": "hi"}]}]},
                                    None)


# ---- scripted bigram models through the real engine --------------------------------------------

def scripted_head(engine, script: dict[int, list[int]]):
    """The engine's parameters with the head solved for `script`, as test_engine's bigram_engine
    solves it (its c_proj are zero, so a token's logits depend on that token alone): rebuilding
    the engine for each script would compile every step again."""
    sources = list(script)
    hidden = np.asarray(model_lib.rms_norm(engine.params["wte"][jnp.array(sources)]), np.float64)
    targets = np.full((len(sources), engine.cfg.vocab_size), -30.0)
    for row, source in enumerate(sources):
        targets[row, script[source]] = 30.0
    params = jax.tree.map(lambda x: x, engine.params)
    params["lm_head"]["kernel"] = jnp.asarray(np.linalg.pinv(hidden) @ targets, jnp.float32)
    return params


def test_bigram_models_that_end_never_end_call_the_calculator_or_stop_on_bos(small_tokenizer):
    """A model whose next token depends on the last one only, scripted after <|assistant_start|>:
    every reply of the first ends, none of the second, every one of the third calls the calculator
    (and ends after its output), the fourth stops on <|bos|>, which is not an end."""
    tok = small_tokenizer
    special = tok.encode_special
    start, end = special("<|assistant_start|>"), special("<|assistant_end|>")
    py_start, py_end, out_end = special("<|python_start|>"), special("<|python_end|>"), special("<|output_end|>")
    one, plus, three = tok.encode("1+3")
    a = tok.encode("a")[0]
    tasks = {"conversation": [qa("the quick fox"), qa("a b c d")], behaviour.ARITHMETIC: [qa("what is 1+3?")]}
    scripts = {"ends": ({start: [end]}, 1.0, 0.0),
               "never ends": ({start: [a], a: [a]}, 0.0, 0.0),
               "calculator": ({start: [py_start], py_start: [one], one: [plus], plus: [three], three: [py_end],
                               out_end: [end]}, 1.0, 1.0),
               "bos": ({start: [a], a: [tok.bos_id]}, 0.0, 0.0)}
    engine = bigram_engine(tok, scripts["ends"][0], buckets=())  # one length: one compile per step
    for name, (script, ends, calls) in scripts.items():
        engine.set_params(scripted_head(engine, script))
        figures = behaviour.behaviour_figures(engine, tok, tasks, None, max_new_tokens=12, max_rows=2)
        assert (figures["prompts"], figures["ends_share"], figures["calculator_share"]) == (3, ends, calls), name
        assert figures["kinds"]["conversation"]["calculator_share"] == calls, name


# ---- a random model: the figures are what each prompt's own stream shows -------------------------

def streamed_reply(engine, prompt, budget):
    """(ended, reply tokens) of the prompt alone, read column by column from Engine.generate: the
    stream shows the token a reply stopped on."""
    reply = []
    for column, _ in engine.generate(prompt, 1, max_tokens=budget, temperature=0.0):
        if column[0] in engine.stop_tokens:
            return column[0] == engine.tokenizer.encode_special("<|assistant_end|>"), reply
        reply.append(column[0])
    return False, reply


def test_random_model_figures_equal_each_prompts_own_stream(trained_tokenizer):
    """A random model made to write <|assistant_end|> and <|python_start|> often (their head
    columns scaled up), so that the counts are neither none nor all."""
    tok, budget = trained_tokenizer, 8
    graphdef, params, cfg = random_model(tok.vocab_size, 0)
    kernel = np.array(params["lm_head"]["kernel"])
    kernel[:, tok.encode_special("<|assistant_end|>")] *= 3.0
    kernel[:, tok.encode_special("<|python_start|>")] *= 2.7
    params["lm_head"]["kernel"] = jnp.asarray(kernel)
    engine = Engine(graphdef, params, cfg, tok)
    tasks = behaviour.held_out_tasks([qa("Hello there"), qa("Tell me about whales.")], data_dir=WORDS, size=3)
    del tasks[behaviour.ARITHMETIC]  # its prompts would need a second length bucket: more to compile
    figures = behaviour.behaviour_figures(engine, tok, tasks, None, max_new_tokens=budget, max_rows=2)

    python_start = tok.encode_special("<|python_start|>")
    for kind, task in tasks.items():
        expected = {"ended": 0, "calculator_calls": 0, "passed": 0}
        for conversation in task:
            ended, reply = streamed_reply(engine, render_for_completion(tok, conversation), budget)
            expected["ended"] += ended
            expected["calculator_calls"] += python_start in reply
            expected["passed"] += kind != "conversation" and task.evaluate(conversation, tok.decode(reply))
        got = figures["kinds"][kind]
        assert {k: got.get(k, 0) for k in expected} == expected, kind
    ended = sum(k["ended"] for k in figures["kinds"].values())
    calls = sum(k["calculator_calls"] for k in figures["kinds"].values())
    assert 0 < ended < figures["prompts"] and 0 < calls < figures["prompts"]
