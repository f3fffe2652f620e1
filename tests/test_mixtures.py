"""The post-training stages' data: the offline recipe built from the package's own files with no
network, every conversation renderable, evaluation data kept out of training, sizes as the
mixtures' docstring states; nanochat's recipe checked against the reference's table (tasks,
splits, sizes) over a local folder of small stand-in files, also with no network."""
import json
import socket
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ml_collections import ConfigDict

from nanochat_jax.conversation import render_conversation
from nanochat_jax.tasks import (ARC, GSM8K, MMLU, ArithmeticRL, ArithmeticWordProblems, ChitChat,
                                IdentityConversations, MultipleChoiceTrain, SimpleSpelling, SmolTalk,
                                SpellingBee, TaskDataError, TaskMixture, mc_eval_tasks, mid_tasks, rl_tasks,
                                sft_tasks)
from nanochat_jax.tasks.sources import OFFLINE_DIR
from nanochat_jax.tokenizer import split_for_training, train_tokenizer
from test_conversation import TOK  # one id per character (ord + 100); the specials are 1..9

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEMO_SHARD = Path(__file__).resolve().parents[1] / "nanochat_jax" / "data" / "demo_corpus" / "shard_00000.parquet"


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """An empty download cache and a task mirror nothing listens on: any download fails loudly."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_TASKS_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # no retry back-off


def config(data_dir: str) -> ConfigDict:
    return ConfigDict({"chat": {"data_dir": data_dir}})


OFFLINE = config("offline")


def leaves(task) -> list:
    """The tasks a mixture is made of (a task that is not a mixture is its own)."""
    return [leaf for part in task.tasks for leaf in leaves(part)] if hasattr(task, "tasks") else [task]


def key(conversation) -> str:
    return json.dumps(conversation["messages"], sort_keys=True)


def prompts(task) -> set[str]:
    """Every conversation's first user message."""
    return {conversation["messages"][0]["content"] for conversation in task}


@pytest.fixture(scope="module")
def offline():
    mid_train, mid_val = mid_tasks(OFFLINE)
    sft_train, sft_val = sft_tasks(OFFLINE)
    rl_train, rl_test = rl_tasks(OFFLINE)
    return {"mid_train": mid_train, "mid_val": mid_val, "sft_train": sft_train, "sft_val": sft_val,
            "rl_train": rl_train, "rl_test": rl_test, **mc_eval_tasks(OFFLINE)}


TRAINING = ("mid_train", "sft_train", "rl_train")


def test_offline_recipe_builds_without_network_or_nanochat_data(offline):
    """Built under the no-network fixture, so nothing was downloaded."""
    for name, task in offline.items():
        for leaf in leaves(task):
            assert not isinstance(leaf, (SmolTalk, GSM8K)), f"{name} uses {type(leaf).__name__}"


def test_offline_rl_tasks_reward_the_right_answer(offline):
    for task in (offline["rl_train"], offline["rl_test"]):
        conversation = task[0]
        reference = "".join(part["text"] for part in conversation["messages"][-1]["content"])
        assert task.reward(conversation, reference) == 1.0
        assert task.reward(conversation, reference.replace("#### ", "#### 1")) == 0.0


def test_downloads_fail_here():
    """The fixture really cuts the network: a task that must download cannot."""
    with pytest.raises(TaskDataError, match="offline"):
        SmolTalk("test")


def test_every_offline_conversation_renders_with_something_to_learn(offline):
    for name, task in offline.items():
        for index in range(len(task)):
            ids, mask = render_conversation(TOK, task[index], max_tokens=1 << 20)
            assert len(ids) == len(mask) and sum(mask) > 0, (name, index)


def test_offline_sizes(offline):
    assert 1000 <= len(offline["sft_train"]) <= 1500
    assert 100 <= len(offline["rl_train"]) <= 200 and len(offline["rl_test"]) >= 64
    assert len(offline["MMLU"]) == 500 and len(offline["ARC-Easy"]) == 400  # the shipped test subsets


def test_offline_midtraining_is_about_340k_tokens(offline):
    """Counted with a 4,096-token tokenizer trained on the demo corpus, as the tiny config's is
    (on less text here, which compresses a few percent worse)."""
    text = "\n".join(pq.read_table(DEMO_SHARD).column("text").to_pylist())[:1_000_000]
    tokenizer = train_tokenizer(split_for_training(text), 4096, num_threads=2)
    tokens = sum(len(render_conversation(tokenizer, conversation, max_tokens=1 << 20)[0])
                 for conversation in offline["mid_train"])
    assert 280_000 <= tokens <= 400_000, tokens


def test_no_gsm8k_in_any_training_mixture(offline):
    gsm8k_test = {json.loads(line)["context"] for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()}
    for name in TRAINING:
        assert not any(isinstance(leaf, GSM8K) for leaf in leaves(offline[name])), name
        assert not prompts(offline[name]) & gsm8k_test, name


def test_no_evaluation_prompt_is_trained_on(offline):
    """ARC and MMLU test and validation, the arithmetic held-out splits, RL's test: none of their
    questions is in a training mixture (chitchat, whose openings repeat, is split by id below)."""
    held_out = [leaf for name in ("mid_val", "rl_test", "MMLU", "ARC-Easy") for leaf in leaves(offline[name])
                if not isinstance(leaf, ChitChat)]
    held_out += [ARC(subset, split, data_dir=OFFLINE_DIR) for subset in ("ARC-Easy", "ARC-Challenge")
                 for split in ("validation", "test")]
    held_out += [MMLU("all", "validation", data_dir=OFFLINE_DIR)]
    evaluated = set().union(*map(prompts, held_out))
    for name in TRAINING:
        assert not prompts(offline[name]) & evaluated, name


def test_rl_trains_on_problems_sft_and_midtraining_never_saw(offline):
    rl_questions = prompts(offline["rl_train"])
    for name in ("mid_train", "sft_train"):
        assert not rl_questions & prompts(offline[name]), name


def test_chitchat_split_is_the_same_in_the_package_and_the_full_file():
    shipped = {split: {key(c) for c in ChitChat(split)} for split in ("train", "val")}
    full = {split: {key(c) for c in ChitChat(split, data_dir=DATA)} for split in ("train", "val")}
    assert shipped["train"] and shipped["val"] and not shipped["train"] & shipped["val"]
    assert shipped["train"] <= full["train"] and shipped["val"] <= full["val"]
    assert 0.05 < len(full["val"]) / (len(full["train"]) + len(full["val"])) < 0.15


def test_multiple_choice_training_questions_render_as_arc():
    """The first CommonsenseQA line of the shared file, by hand."""
    questions = MultipleChoiceTrain("csqa", data_dir=DATA)
    conversation = next(c for c in questions if "sanctions against the school" in c["messages"][0]["content"])
    assert conversation["messages"][0]["content"] == (
        "Multiple Choice question: The sanctions against the school were a punishing blow, and they seemed to "
        "what the efforts the school had made to change?\n"
        "- ignore=A\n- enforce=B\n- authoritarian=C\n- yell at=D\n- avoid=E\n"
        "\nRespond only with the letter of the correct answer.")
    assert conversation["messages"][1]["content"] == "A" and conversation["letters"] == list("ABCDE")
    with pytest.raises(ValueError, match="openbookqa, csqa, socialiqa"):
        MultipleChoiceTrain("race")


def test_packaged_files_are_subsets_of_the_shared_ones():
    for path in OFFLINE_DIR.rglob("*.jsonl"):
        source = set((DATA / path.relative_to(OFFLINE_DIR)).read_text(encoding="utf-8").splitlines())
        assert set(path.read_text(encoding="utf-8").splitlines()) <= source, path
    total = sum(p.stat().st_size for p in OFFLINE_DIR.rglob("*") if p.is_file())
    assert total < 3_000_000


# ---- nanochat's recipe, over a folder of small local files -----------------------------------

def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def nanochat_dir(tmp_path):
    """The shared MMLU, ARC, GSM8K test and word list, and small marked stand-ins for the files
    that are download-only (SmolTalk, MMLU auxiliary_train, GSM8K train)."""
    folder = tmp_path / "data"
    for relative in ("mmlu/test.jsonl", "arc/ARC-Easy_train.jsonl", "arc/ARC-Challenge_train.jsonl",
                     "arc/ARC-Easy_test.jsonl", "gsm8k_test.jsonl", "words/words3to10.txt"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).symlink_to(DATA / relative)
    for split in ("train", "test"):
        write_jsonl(folder / f"smoltalk/{split}.jsonl",
                    [{"messages": [{"role": "user", "content": f"smoltalk {split} {i}"},
                                   {"role": "assistant", "content": "ok"}]} for i in range(30)])
    write_jsonl(folder / "mmlu/auxiliary_train.jsonl",
                [{"question": f"auxiliary {i}", "subject": "", "choices": list("wxyz"), "answer": 0}
                 for i in range(20)])
    write_jsonl(folder / "gsm8k_train.jsonl",
                [{"context": f"gsm8k train {i}", "chain_of_thought": "1+1=<<1+1=2>>2", "answer": "2"}
                 for i in range(25)])
    return config(str(folder))


def describe(task) -> list[tuple[str, int, str]]:
    """Each part's class, size and first prompt's opening words (the stand-ins name their split)."""
    return [(type(leaf).__name__, len(leaf), leaf[0]["messages"][0]["content"][:14]) for leaf in leaves(task)]


def test_nanochat_midtraining_mixture(nanochat_dir):
    train, val = mid_tasks(nanochat_dir)
    assert isinstance(train, TaskMixture) and isinstance(val, TaskMixture)
    parts = describe(train)
    assert [(name, size) for name, size, _ in parts] == [
        ("SmolTalk", 30), ("MMLU", 20), ("GSM8K", 25), ("IdentityConversations", 1000),
        ("IdentityConversations", 1000), ("SimpleSpelling", 200_000), ("SpellingBee", 80_000)]
    assert parts[0][2].startswith("smoltalk train") and parts[2][2].startswith("gsm8k train")
    assert train.tasks[3] is train.tasks[4]  # identity twice: two epochs of the same conversations
    assert all(leaf.split == "train" for leaf in train.tasks[5:])
    assert [(name, size) for name, size, _ in describe(val)] == [("SmolTalk", 30), ("MMLU", 5200), ("GSM8K", 420)]
    assert describe(val)[0][2].startswith("smoltalk test")


def test_nanochat_sft_mixture(nanochat_dir):
    train, val = sft_tasks(nanochat_dir)
    parts = describe(train)
    assert [(name, size) for name, size, _ in parts] == [
        ("ARC", 2251), ("ARC", 1119), ("GSM8K", 25), ("SmolTalk", 30), ("IdentityConversations", 1000),
        ("SimpleSpelling", 300), ("SpellingBee", 300)]  # ARC-Easy and -Challenge train: the reference's sizes
    assert parts[2][2].startswith("gsm8k train") and parts[3][2].startswith("smoltalk train")
    assert train.tasks[3].stop == 10_000
    assert isinstance(val, SmolTalk) and val[0]["messages"][0]["content"].startswith("smoltalk test")


def test_nanochat_rl_and_multiple_choice_evaluation(nanochat_dir):
    train, test = rl_tasks(nanochat_dir)
    assert isinstance(train, GSM8K) and train[0]["messages"][0]["content"].startswith("gsm8k train")
    assert isinstance(test, GSM8K) and len(test) == 1319
    answer = test[0]["messages"][-1]["content"][-1]["text"].split("#### ")[-1]
    assert test.reward(test[0], f"so #### {answer}") == 1.0 and test.reward(test[0], "#### -1e9") == 0.0
    evaluations = mc_eval_tasks(nanochat_dir)
    assert sorted(evaluations) == ["ARC-Easy", "MMLU"]
    assert len(evaluations["MMLU"]) == 14042 and len(evaluations["ARC-Easy"]) == 2376  # the full test splits


def test_nanochat_recipe_without_local_data_downloads():
    """With no folder it goes to the network (which the fixture has cut), not to the package."""
    with pytest.raises(TaskDataError, match="offline"):
        sft_tasks(config(""))


def test_offline_generated_tasks_are_the_training_splits(offline):
    for name in TRAINING:
        for leaf in leaves(offline[name]):
            if isinstance(leaf, (ArithmeticWordProblems, IdentityConversations, SimpleSpelling, SpellingBee)):
                assert leaf.split == "train", (name, type(leaf).__name__)
    assert isinstance(offline["rl_train"], ArithmeticRL) and offline["rl_test"].split == "test"


def test_chat_evaluation_runs_on_the_package():
    """Every task chat_eval knows loads from the shipped files alone."""
    from nanochat_jax.evals.chat import TASKS, load_task
    for name in TASKS:
        task = load_task(name, OFFLINE_DIR)
        assert len(task) > 0 and task[0]["messages"], name
    assert len(load_task("GSM8K", OFFLINE_DIR)) == 250 and len(load_task("HumanEval", OFFLINE_DIR)) == 164
