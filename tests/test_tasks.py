"""The task library against the real datasets in ../shared/datasets (sizes, formats, answers),
hand-written expectations (nanochat's prompt and program formats, GSM8K's tool-call parts), Python's
own semantics (slices, random.Random(42) shuffles, seeding) and a loopback HTTP server standing in
for Hugging Face (download, cache, base-URL override, offline)."""
import functools
import gzip
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import types
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax.conversation import render_conversation, render_for_completion
from nanochat_jax.tasks import (ARC, GSM8K, MMLU, CustomJSON, HumanEval, SimpleSpelling, SmolTalk,
                                SpellingBee, Task, TaskDataError, TaskMixture, TaskSequence, render_mc)
from nanochat_jax.tasks.gsm8k import extract_answer, solution_parts
from nanochat_jax.tasks.humaneval import build_program, extract_code
from nanochat_jax.tasks.spelling import load_words
from nanochat_jax.tools import use_calculator
from test_conversation import TOK  # one id per character (ord + 100); the specials are 1..9

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"



def raw_jsonl(relative):
    opener = gzip.open if relative.endswith(".gz") else open
    with opener(DATA / relative, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    for var in ("NANOCHAT_TASK_DATA", "NANOCHAT_TASKS_URL", "http_proxy", "HTTP_PROXY", "https_proxy",
                "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@functools.cache
def local(name):
    """Each shared-data task loaded once per test session."""
    return {"ARC-Easy": lambda: ARC("ARC-Easy", "test", data_dir=DATA),
            "ARC-Challenge": lambda: ARC("ARC-Challenge", "test", data_dir=DATA),
            "MMLU": lambda: MMLU("all", "test", data_dir=DATA),
            "GSM8K": lambda: GSM8K("main", "test", data_dir=DATA),
            "HumanEval": lambda: HumanEval(data_dir=DATA)}[name]()


# ------------------------------------------------------------------ sizes, order, local folder

@pytest.mark.parametrize("name, size", [("ARC-Easy", 2376), ("ARC-Challenge", 1172), ("MMLU", 14042),
                                        ("GSM8K", 1319), ("HumanEval", 164)])
def test_sizes_of_the_standard_test_sets(name, size):
    assert len(local(name)) == size


def test_order_is_hugging_face_shuffle_with_seed_42():
    """nanochat's load_dataset(...).shuffle(seed=42) is numpy's default_rng(42).permutation."""
    raw = raw_jsonl("arc/ARC-Challenge_test.jsonl")
    task = local("ARC-Challenge")
    order = np.random.default_rng(42).permutation(len(raw))
    questions = [task[i]["messages"][0]["content"].split("\n")[0] for i in range(len(task))]
    assert questions == [f"Multiple Choice question: {raw[j]['question']}" for j in order]


def test_the_task_data_variable_points_at_a_local_folder(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(DATA))
    assert len(ARC("ARC-Easy", "train")) == 2251
    with pytest.raises(TaskDataError, match=r"mmlu/auxiliary_train\.jsonl"):
        MMLU("auxiliary_train", "train")


@pytest.mark.parametrize("make, message", [
    (lambda: ARC("ARC-Medium", "test"), "ARC subset must be one of ARC-Easy, ARC-Challenge; got 'ARC-Medium'"),
    (lambda: MMLU("all", "train"), "MMLU all split must be one of dev, validation, test; got 'train'"),
    (lambda: GSM8K("main", "dev"), "GSM8K split must be one of train, test; got 'dev'"),
    (lambda: SpellingBee(split="val"), "SpellingBee split must be one of train, test; got 'val'")])
def test_bad_arguments_say_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


# ------------------------------------------------------------------ rendering

def assistant_text(ids, mask):
    return TOK.decode([i for i, m in zip(ids, mask) if m])


@pytest.mark.parametrize("name", ["ARC-Easy", "MMLU", "GSM8K", "HumanEval"])
def test_conversations_render_with_the_reference_as_the_trained_tokens(name):
    task = local(name)
    for index in (0, len(task) // 2, len(task) - 1):
        conversation = task[index]
        ids, mask = render_conversation(TOK, conversation, max_tokens=10**6)
        prompt = render_for_completion(TOK, conversation)
        assert ids[:len(prompt)] == prompt and TOK.decode(prompt).endswith("<|assistant_start|>")
        reference = conversation["messages"][-1]["content"]
        if isinstance(reference, str):
            assert assistant_text(ids, mask) == reference + "<|assistant_end|>"


def test_gsm8k_renders_annotations_as_calculator_calls_with_untrained_outputs():
    """Rendered from the raw DCLM fields with a regular expression: every <<expr=result>> becomes
    a python call (trained) and its output (shown, not trained)."""
    raw = {row["context"]: row for row in raw_jsonl("gsm8k_test.jsonl")}
    task = local("GSM8K")
    for index in range(0, len(task), 97):
        conversation = task[index]
        row = raw[conversation["messages"][0]["content"]]
        ids, mask = render_conversation(TOK, conversation, max_tokens=10**6)
        solution = f"{row['chain_of_thought']}\n#### {row['answer']}"
        calls = r"<|python_start|>\1<|python_end|><|output_start|>\2<|output_end|>"
        assert TOK.decode(ids) == ("<|bos|><|user_start|>" + row["context"] + "<|user_end|><|assistant_start|>"
                                   + re.sub(r"<<([^>]*)=([^>=]*)>>", calls, solution) + "<|assistant_end|>")
        assert assistant_text(ids, mask) == (re.sub(r"<<([^>]*)=([^>=]*)>>", r"<|python_start|>\1<|python_end|>",
                                                    solution) + "<|assistant_end|>")


# ------------------------------------------------------------------ multiple choice

def test_render_mc_is_nanochats_format():
    assert render_mc("What is 2+2?", "ABC", ["3", "4", "five"]) == (
        "Multiple Choice question: What is 2+2?\n"
        "- 3=A\n"
        "- 4=B\n"
        "- five=C\n"
        "\n"
        "Respond only with the letter of the correct answer.")


@pytest.mark.parametrize("name, relative", [("ARC-Easy", "arc/ARC-Easy_test.jsonl"),
                                            ("ARC-Challenge", "arc/ARC-Challenge_test.jsonl")])
def test_arc_letters_and_gold_answer_come_from_the_raw_rows(name, relative):
    task, raw = local(name), raw_jsonl(relative)
    for index, row in enumerate(raw[j] for j in np.random.default_rng(42).permutation(len(raw))):
        letters = list("ABCDE"[:len(row["choices"])])
        assert task[index] == {"messages": [{"role": "user", "content": render_mc(row["question"], letters, row["choices"])},
                                            {"role": "assistant", "content": row["answerKey"]}],
                               "letters": letters}
    assert {len(row["choices"]) for row in raw} == {3, 4, 5}  # the odd sizes are covered


def test_mmlu_conversation_from_a_raw_row():
    row = raw_jsonl("mmlu/test.jsonl")[0]  # abstract_algebra, answer index 1
    task = local("MMLU")
    conversation = next(task[i] for i in range(len(task)) if row["question"] in task[i]["messages"][0]["content"])
    assert conversation == {
        "messages": [{"role": "user", "content": "Multiple Choice question: Find the degree for the given field "
                      "extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n- 0=A\n- 4=B\n- 2=C\n- 6=D\n\n"
                      "Respond only with the letter of the correct answer."},
                     {"role": "assistant", "content": "B"}],
        "letters": ["A", "B", "C", "D"], "subject": "abstract_algebra"}


def test_categorical_evaluate_compares_letters():
    task = local("ARC-Easy")
    conversation = task[0]
    gold = conversation["messages"][-1]["content"]
    assert [task.evaluate(conversation, letter) for letter in conversation["letters"]] == [
        letter == gold for letter in conversation["letters"]]
    for bad in ("Z", f" {gold}", gold.lower()):
        with pytest.raises(ValueError, match="one of its letters"):
            task.evaluate(conversation, bad)


# ------------------------------------------------------------------ GSM8K

@pytest.mark.parametrize("text, answer", [
    ("so 9 * 2 = 18\n#### 18", "18"), ("#### 2,125", "2125"), ("#### -5 degrees", "-5"),
    ("#### 18.0", "18.0"), ("#### 7 and later #### 8", "7"), ("the answer is 18", None),
    ("####18", None)])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_gsm8k_reference_answers_on_every_real_problem():
    """The answer extracted from each reference equals the file's own answer field, commas removed
    (14 answers have commas); a completion is judged by that answer alone."""
    raw = {row["context"]: row["answer"] for row in raw_jsonl("gsm8k_test.jsonl")}
    task = local("GSM8K")
    for index in range(len(task)):
        conversation = task[index]
        expected = raw[conversation["messages"][0]["content"]].replace(",", "")
        assert extract_answer(conversation["messages"][-1]["content"][-1]["text"]) == expected
        assert task.evaluate(conversation, f"Some reasoning.\n#### {expected}")
        assert not task.evaluate(conversation, f"#### {int(expected) + 1}")
        assert not task.evaluate(conversation, expected)  # no #### marker
    assert sum("," in answer for answer in raw.values()) == 14


def test_gsm8k_parts_of_a_real_problem():
    task = local("GSM8K")
    janet = next(task[i] for i in range(len(task)) if task[i]["messages"][0]["content"].startswith("Janet’s ducks"))
    assert janet["messages"][1]["content"] == [
        {"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
        {"type": "python", "text": "16-3-4"},
        {"type": "python_output", "text": "9"},
        {"type": "text", "text": "9 duck eggs a day.\nShe makes 9 * 2 = $"},
        {"type": "python", "text": "9*2"},
        {"type": "python_output", "text": "18"},
        {"type": "text", "text": "18 every day at the farmer’s market.\n#### 18"}]
    assert task.evaluate(janet, "She makes $18.\n#### 18")
    assert not task.evaluate(janet, "#### 18.0")  # compared as strings, as nanochat


def test_solution_parts_of_unusual_annotations():
    """As nanochat: the result follows the last '=', an annotation without one has no result,
    and an annotation may open or close the solution."""
    assert solution_parts("<<x=1=1>> then <<2*3>>\n#### 6") == [
        {"type": "python", "text": "x=1"}, {"type": "python_output", "text": "1"},
        {"type": "text", "text": " then "},
        {"type": "python", "text": "2*3"}, {"type": "python_output", "text": ""},
        {"type": "text", "text": "\n#### 6"}]


# ------------------------------------------------------------------ HumanEval

def test_humaneval_program_is_nanochats():
    conversation = {"messages": [{"role": "user", "content": "# helpers\nimport math\n  from typing import List\n\n"
                                  "def f(x):\n    import os\n"},
                                 {"role": "assistant", "content": "unused"}],
                    "test": "def check(candidate):\n    assert candidate(4) == 2\n", "entry_point": "f"}
    completion = "Here you go:\n```python\ndef f(x):\n    return math.isqrt(x)\n```\nand ```\nignored\n```"
    assert build_program(conversation, completion) == (
        "import math\nfrom typing import List\n\n"
        "def f(x):\n    return math.isqrt(x)\n\n"
        "def check(candidate):\n    assert candidate(4) == 2\n\n"
        "check(f)")


@pytest.mark.parametrize("completion, code", [
    ("```\ndef g():\n    pass\n```", "def g():\n    pass"),
    ("text\n```python   \n  x = 1\n```", "x = 1"),
    ("  def g(): return 1\n", "def g(): return 1"),
    ("```python\nunclosed", "```python\nunclosed")])
def test_extract_code(completion, code):
    assert extract_code(completion) == code


def run_in_subprocess(program, timeout_s):
    """A stand-in for nanochat_jax.execution.execute_code: the program's exit status."""
    try:
        result = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return types.SimpleNamespace(passed=False)
    return types.SimpleNamespace(passed=result.returncode == 0)


def judge_real_problems(task):
    by_entry = {task[i]["entry_point"]: task[i] for i in range(len(task))}
    row = next(r for r in raw_jsonl("humaneval/HumanEval.jsonl.gz") if r["task_id"] == "HumanEval/0")
    conversation = by_entry[row["entry_point"]]
    right = f"Sure:\n```python\n{row['prompt']}{row['canonical_solution']}```\nDone."
    wrong = f"```python\n{row['prompt']}    return not True\n```"
    return task.evaluate(conversation, right), task.evaluate(conversation, wrong)


def test_humaneval_judges_a_real_problem_by_running_its_tests(monkeypatch):
    calls = []

    def execute_code(program, timeout_s):
        calls.append(timeout_s)
        return run_in_subprocess(program, timeout_s)

    monkeypatch.setitem(sys.modules, "nanochat_jax.execution", types.SimpleNamespace(execute_code=execute_code))
    task = HumanEval(data_dir=DATA, timeout_s=7.5)
    assert judge_real_problems(task) == (True, False)
    assert calls == [7.5, 7.5]


def test_humaneval_with_the_real_sandbox():
    pytest.importorskip("nanochat_jax.execution")
    assert judge_real_problems(local("HumanEval")) == (True, False)


# ------------------------------------------------------------------ spelling

def test_spelling_splits_draw_from_disjoint_words():
    """nanochat seeded test example i with -(i+1), and Python seeds n and -n alike, so its test
    example i was train example i+1. Here no word is in both splits."""
    assert random.Random(-4).random() == random.Random(4).random()  # the bug's cause
    train, test = load_words("train", DATA), load_words("test", DATA)
    assert not set(train) & set(test)
    unique = {line.strip().lower() for line in (DATA / "words/words3to10.txt").read_text().splitlines()}
    assert len(train) + len(test) == len(unique) == 150_010
    assert 0.09 < len(test) / len(unique) < 0.11
    for make in (SpellingBee, SimpleSpelling):
        tasks = {split: make(size=300, split=split, data_dir=DATA) for split in ("train", "test")}
        words = {split: {spelled_word(task[i]) for i in range(len(task))} for split, task in tasks.items()}
        assert not words["train"] & words["test"]


def spelled_word(conversation):
    """The word spelled out in a spelling conversation (the line `word:w,o,r,d`)."""
    content = conversation["messages"][1]["content"]
    text = content if isinstance(content, str) else content[0]["text"]
    word, letters = re.search(r"^([a-z]+):([a-z,]+)$", text, re.MULTILINE).groups()
    assert letters.split(",") == list(word)
    return word


def test_spelling_examples_are_deterministic_across_processes():
    here = [SpellingBee(size=5, split="test", data_dir=DATA)[i] for i in range(5)]
    assert here == [SpellingBee(size=5, split="test", data_dir=DATA)[i] for i in range(5)]
    code = ("import json, sys; from nanochat_jax.tasks.spelling import SpellingBee; "
            f"t = SpellingBee(size=5, split='test', data_dir={str(DATA)!r}); print(json.dumps([t[i] for i in range(5)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONHASHSEED="123"), cwd=Path(__file__).parents[1])
    assert json.loads(out.stdout) == here


def test_spelling_bee_counts_are_right():
    task = SpellingBee(size=200, split="train", data_dir=DATA)
    for i in range(len(task)):
        conversation = task[i]
        parts = conversation["messages"][1]["content"]
        call = next(p["text"] for p in parts if p["type"] == "python")
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", call).groups()
        count = word.count(letter)
        assert use_calculator(call) == count
        assert [p["text"] for p in parts if p["type"] == "python_output"] == [str(count)]
        assert parts[0]["text"].count(" hit! ") == count
        assert word in conversation["messages"][0]["content"] and spelled_word(conversation) == word
        assert parts[-1]["text"].endswith(f"#### {count}")
        assert task.evaluate(conversation, f"It has {count}.\n#### {count}")
        assert not task.evaluate(conversation, f"#### {count + 1}")
        render_conversation(TOK, conversation)


def test_simple_spelling_judges_the_exact_spelling():
    task = SimpleSpelling(size=3, split="test", data_dir=DATA)
    conversation = task[0]
    word = conversation["messages"][0]["content"].removeprefix("Spell the word: ")
    assert conversation["messages"][1]["content"] == word + ":" + ",".join(word)
    assert task.evaluate(conversation, f" {word}:{','.join(word)}\n")
    assert not task.evaluate(conversation, f"{word}:{','.join(word[::-1])}")


# ------------------------------------------------------------------ slicing and combinators

class Listed(Task):
    eval_type = "generative"

    def __init__(self, name, size, **kwargs):
        super().__init__(**kwargs)
        self.name, self.size = name, size

    def num_examples(self):
        return self.size

    def get_example(self, index):
        return {"messages": [], "id": (self.name, index)}


def ids(task):
    return [conversation["id"] for conversation in task]  # iteration stops at IndexError


@pytest.mark.parametrize("start, stop, step", [(0, None, 1), (3, None, 1), (2, 8, 3), (0, 10, 4), (5, 5, 1),
                                               (7, 50, 2), (12, None, 1), (0, None, 11)])
def test_slicing_is_python_slicing(start, stop, step):
    task = Listed("t", 10, start=start, stop=stop, step=step)
    expected = [("t", i) for i in list(range(10))[start:stop:step]]
    assert ids(task) == expected and len(task) == len(expected)
    with pytest.raises(IndexError):
        task[len(expected)]


@pytest.mark.parametrize("kwargs", [dict(start=-1), dict(start=4, stop=3), dict(step=0)])
def test_bad_slices_are_refused(kwargs):
    with pytest.raises(ValueError):
        Listed("t", 10, **kwargs)


def test_slicing_a_real_task():
    task = local("ARC-Easy")
    sliced = ARC("ARC-Easy", "test", data_dir=DATA, start=5, stop=10)
    assert len(sliced) == 5 and [sliced[i] for i in range(5)] == [task[i] for i in range(5, 10)]


def test_mixture_order_is_random_42_shuffle_of_all_pairs():
    """nanochat: the list of (task index, example index) pairs, shuffled with random.Random(42).
    A task passed twice is sampled twice."""
    a, b, c = Listed("a", 3), Listed("b", 50), Listed("c", 2, start=1)
    tasks = [a, b, c, a]
    pairs = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
    random.Random(42).shuffle(pairs)
    expected = [tasks[t][i]["id"] for t, i in pairs]
    assert ids(TaskMixture(tasks)) == expected
    assert ids(TaskMixture(tasks, start=10, stop=20, step=3)) == expected[10:20:3]
    assert ids(TaskMixture([])) == []


def test_sequence_is_concatenation():
    tasks = [Listed("a", 3), Listed("b", 0), Listed("c", 4, step=2)]
    assert ids(TaskSequence(tasks)) == [("a", 0), ("a", 1), ("a", 2), ("c", 0), ("c", 2)]
    assert ids(TaskSequence(tasks, start=2, stop=4)) == [("a", 2), ("c", 0)]


# ------------------------------------------------------------------ CustomJSON and SmolTalk

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_custom_json_reads_both_line_forms(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    system = [{"role": "system", "content": "be brief"}]
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(chat), "", json.dumps({"id": 7, "messages": system + chat})])
    task = CustomJSON(path)
    assert [task[i] for i in range(len(task))] == [{"messages": chat}, {"messages": system + chat}]


@pytest.mark.parametrize("bad_line, message", [
    ('{"messages": [', r"c\.jsonl, line 3: not valid JSON"),
    ('[{"role": "assistant", "content": "hi"}]', r"line 3: message 0: expected role 'user', got 'assistant'"),
    ('[{"role": "user", "content": "hi"}]', r"line 3: the conversation has no assistant message"),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant"}]', r"line 3: message 1 \(assistant\) has no 'content'"),
    ('"just text"', r"line 3: a conversation must be a dict")])
def test_custom_json_errors_name_the_line(tmp_path, bad_line, message):
    good = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with pytest.raises(TaskDataError, match=message):
        CustomJSON(write_lines(tmp_path / "c.jsonl", [good, "", bad_line, good]))


def test_custom_json_missing_file(tmp_path):
    with pytest.raises(TaskDataError, match="no such conversation file"):
        CustomJSON(tmp_path / "absent.jsonl")


def test_chitchat_loads_as_custom_json():
    task = CustomJSON(DATA / "chitchat" / "conversations.jsonl")
    assert len(task) == 4017
    render_conversation(TOK, task[len(task) - 1])


# ------------------------------------------------------------------ download

class Mirror:
    """A loopback HTTP server over `root` that records the paths it is asked for."""

    def __init__(self, root):
        self.requests = []
        mirror = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """Hugging Face's layout under a path prefix, in Hugging Face's formats (built from the
    shared files): ARC with labelled choices, MMLU auxiliary_train wrapped in a 'train' field,
    GSM8K with the solution ending in '#### answer', SmolTalk conversations, nanochat's word list."""
    root = tmp_path / "www"
    hf = root / "prefix" / "datasets"

    def parquet(relative, rows):
        path = hf / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)

    arc = raw_jsonl("arc/ARC-Challenge_test.jsonl")
    parquet("allenai/ai2_arc/resolve/main/ARC-Challenge/test-00000-of-00001.parquet",
            [dict(row, choices={"text": row["choices"], "label": list("ABCDE"[:len(row["choices"])])})
             for row in arc])
    mmlu = raw_jsonl("mmlu/dev.jsonl")
    parquet("cais/mmlu/resolve/main/auxiliary_train/train-00000-of-00001.parquet", [{"train": row} for row in mmlu])
    gsm8k = raw_jsonl("gsm8k_test.jsonl")
    parquet("openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet",
            [{"question": r["context"], "answer": f"{r['chain_of_thought']}\n#### {r['answer']}"} for r in gsm8k])
    parquet("HuggingFaceTB/smol-smoltalk/resolve/main/data/test-00000-of-00001.parquet", SMOLTALK)
    words = root / "prefix" / "dwyl/english-words/refs/heads/master/words_alpha.txt"
    words.parent.mkdir(parents=True)
    words.write_text("\n".join(WORDS) + "\n")
    server = Mirror(root)
    monkeypatch.setenv("NANOCHAT_TASKS_URL", server.url + "/prefix/")
    yield server
    server.close()


SMOLTALK = [{"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i}."}], "source": "test"} for i in range(30)]
WORDS = ["Apple", "banana", "cherry", "x-ray", "banana", "dates", "éclair", "fig"]


def test_download_through_the_base_url_override_into_the_cache(mirror, tmp_path):
    task = ARC("ARC-Challenge", "test")
    assert mirror.requests == ["/prefix/datasets/allenai/ai2_arc/resolve/main/ARC-Challenge/test-00000-of-00001.parquet"]
    assert (tmp_path / "base" / "task_data" / "datasets/allenai/ai2_arc/resolve/main/ARC-Challenge"
            / "test-00000-of-00001.parquet").is_file()
    reference = local("ARC-Challenge")
    assert [task[i] for i in range(len(task))] == [reference[i] for i in range(len(reference))]
    mirror.close()
    again = ARC("ARC-Challenge", "test")  # from the cache: the server is gone
    assert len(again) == 1172 and len(mirror.requests) == 1


def test_hugging_face_formats_normalise_like_the_local_files(mirror):
    gsm8k = GSM8K("main", "test")
    reference = local("GSM8K")
    assert [gsm8k[i] for i in range(0, 1319, 7)] == [reference[i] for i in range(0, 1319, 7)]
    aux = MMLU("auxiliary_train", "train")
    dev = MMLU("all", "dev", data_dir=DATA)
    assert len(aux) == 285 and [aux[i] for i in range(285)] == [dev[i] for i in range(285)]
    smoltalk = SmolTalk("test")
    order = np.random.default_rng(42).permutation(len(SMOLTALK))
    assert [smoltalk[i] for i in range(len(smoltalk))] == [{"messages": SMOLTALK[j]["messages"]} for j in order]
    render_conversation(TOK, smoltalk[0])


def test_word_list_download_keeps_lowercase_letter_words_once(mirror):
    train, test = load_words("train"), load_words("test")
    assert mirror.requests == ["/prefix/dwyl/english-words/refs/heads/master/words_alpha.txt"]
    assert sorted(train + test) == ["apple", "banana", "cherry", "dates", "fig"]


def test_offline_download_says_how_to_work_offline(monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("NANOCHAT_TASKS_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    with pytest.raises(TaskDataError, match=r"offline\? Point \$NANOCHAT_TASK_DATA"):
        HumanEval()


def test_missing_remote_file_is_reported(mirror):
    with pytest.raises(TaskDataError, match="HTTP 404"):
        SmolTalk("train")
