"""The project's own chat data: deterministic, disjoint splits (and RL disjoint from SFT),
calculator outputs that are the calculator's, answers recomputed here from each question's
numbers, and judged like GSM8K."""
import json
import re

import pytest

from nanochat_jax.conversation import render_conversation
from nanochat_jax.tasks.gsm8k import extract_answer
from nanochat_jax.tasks.synthetic import ArithmeticRL, ArithmeticWordProblems, IdentityConversations
from nanochat_jax.tools import use_calculator

TASKS = (IdentityConversations, ArithmeticWordProblems, ArithmeticRL)
# each template's answer from the numbers of its question, in the order they appear
ANSWERS = {
    "change": lambda count, price, paid: paid - count * price,
    "sharing": lambda total, friends: total % friends,
    "travel": lambda hours1, speed1, hours2, speed2: hours1 * speed1 + hours2 * speed2,
    "work_time": lambda minutes, days, rate: minutes * days // 60 * rate,
}


class CharTokenizer:
    bos_id = 1

    def encode(self, text):
        return [ord(c) + 100 for c in text]

    def encode_special(self, name):
        return {"<|user_start|>": 2, "<|user_end|>": 3, "<|assistant_start|>": 4, "<|assistant_end|>": 5,
                "<|python_start|>": 6, "<|python_end|>": 7, "<|output_start|>": 8, "<|output_end|>": 9}[name]


def key(conversation):
    return json.dumps(conversation["messages"])


def assistant_parts(conversation):
    return [part for message in conversation["messages"] if message["role"] == "assistant"
            for part in (message["content"] if isinstance(message["content"], list)
                         else [{"type": "text", "text": message["content"]}])]


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_deterministic_whatever_the_order_of_access(task):
    forward = [task(size=30, split=split)[i] for split in ("train", "test") for i in range(30)]
    backward = [task(size=30, split=split)[i] for split in ("train", "test") for i in reversed(range(30))]
    assert forward[:30] == backward[:30][::-1] and forward[30:] == backward[30:][::-1]
    assert len(task(size=30)) == 30
    assert len({key(c) for c in forward}) > 40  # varied


def test_splits_are_disjoint_and_rl_never_trains_on_sft_problems():
    identity_train = {key(c) for c in IdentityConversations(size=600)}
    assert not identity_train & {key(c) for c in IdentityConversations(size=200, split="test")}
    question = lambda c: c["messages"][0]["content"]
    sft_train = {question(c) for c in ArithmeticWordProblems(size=600)}
    rl_train = {question(c) for c in ArithmeticRL(size=600)}
    test = {question(c) for task in (ArithmeticWordProblems, ArithmeticRL) for c in task(size=200, split="test")}
    assert len(sft_train) > 500 and len(rl_train) > 500 and len(test) > 300
    assert not sft_train & test and not rl_train & test and not sft_train & rl_train


@pytest.mark.parametrize("task", [ArithmeticWordProblems, ArithmeticRL])
def test_word_problems_are_right_and_their_calculator_outputs_are_the_calculators(task):
    examples = [c for split in ("train", "test") for c in task(size=100, split=split)]
    assert {c["template"] for c in examples} == set(ANSWERS)
    for conversation in examples:
        parts = conversation["messages"][1]["content"]
        for i, part in enumerate(parts):
            if part["type"] == "python":
                assert parts[i + 1] == {"type": "python_output", "text": str(use_calculator(part["text"]))}
        numbers = [int(n) for n in re.findall(r"\d+", conversation["messages"][0]["content"])]
        expected = str(ANSWERS[conversation["template"]](*numbers))
        assert extract_answer(parts[-1]["text"]) == expected == conversation["answer"]


@pytest.mark.parametrize("task", TASKS)
def test_conversations_render_with_only_the_assistants_writing_trained(task):
    tok = CharTokenizer()
    for conversation in task(size=20):
        ids, mask = render_conversation(tok, conversation)
        parts = assistant_parts(conversation)
        written = sum(len(p["text"]) + 2 * (p["type"] == "python") for p in parts if p["type"] != "python_output")
        turns = sum(m["role"] == "assistant" for m in conversation["messages"])
        assert sum(mask) == written + turns  # + one <|assistant_end|> per turn
        assert len(ids) == len(mask) < 2048


def test_identity_conversations_say_who_the_assistant_is():
    conversations = list(IdentityConversations(size=200))
    for conversation in conversations:
        roles = [m["role"] for m in conversation["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 2 <= len(roles) <= 8
    replies = [m["content"] for c in conversations for m in c["messages"] if m["role"] == "assistant"]
    assert sum("nanochat-jax" in r for r in replies) > 50
    assert sum(len(c["messages"]) >= 6 for c in conversations) > 20  # several turns


@pytest.mark.parametrize("task", [ArithmeticWordProblems, ArithmeticRL])
def test_evaluate_takes_the_reference_and_refuses_a_wrong_answer(task):
    problems = task(size=20, split="test")
    for conversation in problems:
        reference = "".join(part["text"] for part in conversation["messages"][1]["content"])
        wrong = reference.replace(f"#### {conversation['answer']}", f"#### {int(conversation['answer']) + 1}")
        assert problems.evaluate(conversation, reference)
        assert problems.evaluate(conversation, "so #### " + conversation["answer"])
        assert not problems.evaluate(conversation, wrong)
        assert not problems.evaluate(conversation, conversation["answer"])  # no ####
    rl = ArithmeticRL(size=1)
    conversation = rl[0]
    assert rl.reward(conversation, f"#### {conversation['answer']}") == 1.0
    assert rl.reward(conversation, "#### -1") == 0.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split must be one of train, test"):
        ArithmeticRL(split="val")
    with pytest.raises(ValueError, match="size must be >= 0"):
        IdentityConversations(size=-1)
