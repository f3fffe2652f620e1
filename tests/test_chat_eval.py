"""Chat evaluation: letter scoring against a per-prompt forward pass, pass@k and ChatCORE against
hand-made numbers, the generative loop through the engine, and the launcher end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import model as model_lib
from nanochat_jax import sharding
from nanochat_jax.conversation import render_for_completion
from nanochat_jax.data.shards import DEMO_DIR, iter_documents
from nanochat_jax.engine import Engine
from nanochat_jax.evals import chat
from nanochat_jax.tokenizer import split_for_training, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
LETTERS = ["A", "B", "C", "D"]


@pytest.fixture(scope="session")
def tokenizer():
    """A real 512-token tokenizer (the letters must be single tokens of a trained vocabulary)."""
    docs = list(iter_documents([DEMO_DIR / "shard_00000.parquet"]))[:300]
    return train_tokenizer((p for d in docs for p in split_for_training(d)), 512)


def random_params(cfg, seed: int, *, zero_c_proj: bool = False):
    """Gaussian weights drawn in NumPy (no compile); every layer matters unless `zero_c_proj`:
    then no block adds anything and the logits depend on the last token only (a bigram model)."""
    _, shapes, _ = model_lib.abstract_model(cfg)
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = [np.zeros(x.shape, np.float32) if zero_c_proj and "c_proj" in jax.tree_util.keystr(path) else
              rng.normal(0, x.shape[0] ** -0.5, x.shape).astype(np.float32) for path, x in paths]
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])


def random_model(vocab_size: int, seed: int, *, zero_c_proj: bool = False):
    """(graphdef, params, cfg) of a tiny random model with a 256-token context."""
    cfg = model_lib.GPTConfig(vocab_size=vocab_size, n_layer=2, dim=64, n_head=2, n_kv_head=1, sequence_len=256)
    return model_lib.abstract_model(cfg)[0], random_params(cfg, seed, zero_c_proj=zero_c_proj), cfg


@pytest.fixture(scope="session")
def model(tokenizer):
    return random_model(tokenizer.vocab_size, 0)


def mc_conversation(question: str, letters=LETTERS, answer="A"):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "letters": letters}


QUESTIONS = [mc_conversation("Which?"), mc_conversation("Is the sea salty or sweet? " * 3, ["A", "B", "C"]),
             mc_conversation("A longer question about whales, ships and the sea. " * 6),
             mc_conversation("x" * 20, ["A", "B", "C", "D", "E"]), mc_conversation("What does the captain hunt?")]


forward = jax.jit(model_lib.forward, static_argnums=0)


def last_logits_alone(graphdef, params, tokenizer, conversation) -> np.ndarray:
    """The logits at the last position of the prompt's own, unpadded forward pass."""
    prompt = render_for_completion(tokenizer, conversation)
    return np.asarray(forward(graphdef, params, jnp.asarray([prompt])))[0, -1]


def best_letter(tokenizer, conversation, logits) -> str:
    ids = [tokenizer.encode(letter)[0] for letter in conversation["letters"]]
    return conversation["letters"][int(np.argmax(logits[ids]))]


def answer(scorer, conversations, on_batch=None) -> list[str]:
    prompts = [render_for_completion(scorer.tokenizer, c) for c in conversations]
    return scorer.answers(prompts, [c["letters"] for c in conversations], on_batch)


# ---- categorical --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def reference(tokenizer, model):
    graphdef, params, _ = model
    return [last_logits_alone(graphdef, params, tokenizer, c) for c in QUESTIONS]


def test_letter_answers_equal_each_prompts_own_forward(tokenizer, model, reference):
    """Batched, sorted, padded and bucketed, each prompt's logits are its own forward pass's, and
    its answer is the best of its letters there."""
    graphdef, params, cfg = model
    lengths = [len(render_for_completion(tokenizer, c)) for c in QUESTIONS]
    assert sorted(lengths)[3] < 64 < max(lengths)  # two buckets
    scorer = chat.LetterScorer(graphdef, params, cfg, tokenizer, 4)
    batches, logits, real = [], [], scorer.last_logits
    scorer.last_logits = lambda *args: logits.append(np.asarray(real(*args))) or logits[-1]
    answers = answer(scorer, QUESTIONS, on_batch=lambda indices, _: batches.append(indices))
    assert sorted(i for b in batches for i in b) == list(range(len(QUESTIONS))) and len(batches) == 2
    for indices, batch_logits in zip(batches, logits):  # the second batch: the longest prompt, 3 padding rows
        for row, i in enumerate(indices):
            np.testing.assert_allclose(batch_logits[row], reference[i], atol=2e-5)
    assert answers == [best_letter(tokenizer, c, r) for c, r in zip(QUESTIONS, reference)]


def test_padding_and_bucketing_leave_the_last_logits_unchanged(tokenizer, model):
    graphdef, params, cfg = model
    scorer = chat.LetterScorer(graphdef, params, cfg, tokenizer, 2)
    prompts = [render_for_completion(tokenizer, c) for c in QUESTIONS[:2]]
    width = chat.bucket_length(max(map(len, prompts)))
    tokens = np.full((2, width), 7, np.int32)  # padded with an arbitrary token, not only <|bos|>
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    got = np.asarray(scorer.last_logits(params, tokens, np.array([len(p) - 1 for p in prompts], np.int32)))
    for row, conversation in enumerate(QUESTIONS[:2]):
        np.testing.assert_allclose(got[row], last_logits_alone(graphdef, params, tokenizer, conversation), atol=2e-5)
    assert [chat.bucket_length(n) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]


def test_letter_answers_split_over_a_mesh_equal_one_device(tokenizer, model, reference):
    graphdef, params, cfg = model
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rules = sharding.parse_rules({"batch": "data,fsdp", "embed": "fsdp", "vocab": "", "heads": "", "mlp": "",
                                  "act_embed": "", "act_seq": "", "act_heads": "", "act_mlp": ""})
    scorer = chat.LetterScorer(graphdef, params, cfg, tokenizer, 8, mesh, rules)
    assert answer(scorer, QUESTIONS) == [best_letter(tokenizer, c, r) for c, r in zip(QUESTIONS, reference)]


def test_only_an_allowed_letter_is_ever_picked(tokenizer):
    """A bigram model (c_proj at zero: the logits depend on the last token only) whose top token
    after <|assistant_start|> is a non-letter, then C, then the other letters: the answer is C.
    (After the token before it, <|user_end|>, A would win: the answer is read at the right place.)"""
    graphdef, params, cfg = random_model(tokenizer.vocab_size, 1, zero_c_proj=True)
    start, user_end = tokenizer.encode_special("<|assistant_start|>"), tokenizer.encode_special("<|user_end|>")
    letter_ids = {letter: tokenizer.encode(letter)[0] for letter in LETTERS}
    targets = np.full((2, cfg.vocab_size), -30.0)
    targets[0, tokenizer.encode("x")[0]] = 30.0
    targets[0, [letter_ids[letter] for letter in LETTERS]] = [-5.0, 0.0, 10.0, -1.0]
    targets[1, [letter_ids[letter] for letter in LETTERS]] = [10.0, 0.0, -5.0, -1.0]
    hidden = np.asarray(model_lib.rms_norm(params["wte"][jnp.array([start, user_end])]), np.float64)
    params["lm_head"]["kernel"] = jnp.asarray(np.linalg.pinv(hidden) @ targets, jnp.float32)
    full = np.asarray(forward(graphdef, params, jnp.asarray([[tokenizer.bos_id, start]])))[0, -1]
    assert int(np.argmax(full)) not in letter_ids.values()

    scorer = chat.LetterScorer(graphdef, params, cfg, tokenizer, 4)
    assert answer(scorer, QUESTIONS[:3]) == ["C", "C", "C"]
    result = chat.evaluate_categorical("stub", StubTask(QUESTIONS[:3], "categorical"), scorer)
    assert (result.passed, result.problems) == (0, 3)  # the gold letter is A


def test_a_letter_that_is_not_one_token_is_a_clear_error(tokenizer, model):
    graphdef, params, cfg = model
    scorer = chat.LetterScorer(graphdef, params, cfg, tokenizer, 2)
    with pytest.raises(chat.ChatEvalError, match="'Qzxv' encodes to .* tokens"):
        answer(scorer, [mc_conversation("Which?", ["A", "Qzxv"])])


# ---- generative ---------------------------------------------------------------------------------

class StubTask:
    """Conversations with a judge: `verdicts[(problem, completion)]` (default False), or the gold
    letter for categorical ones."""

    def __init__(self, conversations, eval_type="generative", verdicts=None):
        self.conversations, self.eval_type, self.verdicts = conversations, eval_type, verdicts or {}

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, i):
        return self.conversations[i]

    def evaluate(self, conversation, completion):
        if self.eval_type == "categorical":
            return completion == conversation["messages"][-1]["content"]
        return self.verdicts.get((self.conversations.index(conversation), completion), False)


class ScriptedEngine:
    """generate_many returning each prompt's rows as prompt + the tokens of `texts[problem][sample]`."""

    cfg = model_lib.GPTConfig(vocab_size=512, n_layer=1, dim=64, n_head=1, n_kv_head=1, sequence_len=256)

    def __init__(self, tokenizer, texts, prompts):
        self.tokenizer, self.texts, self.prompts, self.calls = tokenizer, texts, prompts, []

    def generate_many(self, prompts, num_samples, **kwargs):
        self.calls.append((len(prompts), num_samples, kwargs))
        out = []
        for prompt in prompts:
            samples = self.texts[self.prompts.index(prompt)]
            assert len(samples) == num_samples
            rows = [prompt + self.tokenizer.encode(text) for text in samples]
            out.append((rows, [[0] * len(prompt) + [1] * (len(r) - len(prompt)) for r in rows]))
        return out


def qa(question):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "ref"}]}


def test_pass_at_k_counts_a_problem_once_if_any_sample_passes(tokenizer):
    conversations = [qa(f"Problem number {i}?") for i in range(5)]
    texts = [[f"p{i} s{j}" for j in range(3)] for i in range(5)]
    # hand-made judgements: problem 0 passes on its last sample, 1 never, 2 on all, 3 on the first, 4 never
    passing = {(0, 2), (2, 0), (2, 1), (2, 2), (3, 0)}
    task = StubTask(conversations, verdicts={(i, texts[i][j]): True for i, j in passing})
    prompts = [render_for_completion(tokenizer, c) for c in conversations]
    engine = ScriptedEngine(tokenizer, texts, prompts)
    sampling = chat.Sampling(num_samples=3, max_tokens=20, temperature=0.7, top_k=5, max_rows=3, seed=10)
    result = chat.evaluate_generative("stub", task, engine, sampling)
    assert (result.passed, result.problems, result.accuracy) == (3, 5, 0.6)
    # one problem's three rows at a time: four problems per call, each call seeded by its first problem
    assert [(n, k, kw["seed"], kw["max_rows"], kw["temperature"], kw["top_k"], kw["max_tokens"])
            for n, k, kw in engine.calls] == [(4, 3, 10, 3, 0.7, 5, 20), (1, 3, 14, 3, 0.7, 5, 20)]
    assert chat.evaluate_generative("stub", task, engine, sampling, max_problems=2).accuracy == 0.5


def test_generative_loop_judges_what_the_engine_writes_for_each_problem(tokenizer, model):
    """Through the real engine: each problem's completion is the text generate_batch writes for
    its prompt alone, and the judge's verdict on it is what is counted."""
    graphdef, params, cfg = model
    engine = Engine(graphdef, params, cfg, tokenizer)
    conversations = [qa("Call me Ishmael."), qa("What is the whale?"), qa("Some years ago, never mind how long")]
    written = []
    for c in conversations:
        prompt = render_for_completion(tokenizer, c)
        rows, _ = engine.generate_batch(prompt, max_tokens=6, temperature=0.0)
        written.append(tokenizer.decode(rows[0][len(prompt):]))
    assert len(set(written)) == 3
    # problem 1's judge wants something else than what the model writes
    task = StubTask(conversations, verdicts={(0, written[0]): True, (1, written[1] + "!"): True, (2, written[2]): True})
    sampling = chat.Sampling(max_tokens=6, max_rows=2)
    result = chat.evaluate_generative("stub", task, engine, sampling)
    assert (result.passed, result.problems, result.too_long) == (2, 3, 0)


def test_long_prompts_are_scored_whole_but_generation_needs_room(tokenizer, model):
    """Categorical prompts past the training context are scored uncropped (as CORE's); a
    generative prompt with no room left to answer counts as failed and never reaches the engine."""
    graphdef, params, cfg = model
    long_question = "Call me Ishmael. Some years ago, never mind how long precisely. " * 30
    assert len(render_for_completion(tokenizer, qa(long_question))) > cfg.sequence_len
    conversations = QUESTIONS[:2] + [mc_conversation(long_question)]
    task = StubTask(conversations, "categorical")
    scorer = chat.LetterScorer(graphdef, params, cfg, tokenizer, 4)
    result = chat.evaluate_categorical("stub", task, scorer)
    expected = sum(best_letter(tokenizer, c, last_logits_alone(graphdef, params, tokenizer, c)) == "A"
                   for c in conversations)
    assert (result.passed, result.problems, result.too_long) == (expected, 3, 0)

    conversations = [qa("Problem?"), qa(long_question)]
    prompts = [render_for_completion(tokenizer, c) for c in conversations]
    engine = ScriptedEngine(tokenizer, [["right"], ["right"]], prompts)
    task = StubTask(conversations, verdicts={(0, "right"): True, (1, "right"): True})
    result = chat.evaluate_generative("stub", task, engine, chat.Sampling())
    assert (result.passed, result.problems, result.too_long) == (1, 2, 1)
    assert [n for n, _, _ in engine.calls] == [1]  # the long prompt never reached the engine


# ---- ChatCORE -----------------------------------------------------------------------------------

def test_chatcore_centres_each_task_on_its_baseline():
    accuracies = {"ARC-Easy": 0.55, "ARC-Challenge": 0.40, "MMLU": 0.31, "GSM8K": 0.05, "HumanEval": 0.10,
                  "SpellingBee": 0.90}
    # (0.55-.25)/.75 = 0.4, (0.40-.25)/.75 = 0.2, (0.31-.25)/.75 = 0.08, then 0.05, 0.10, 0.90: sum 1.73
    score, partial = chat.chatcore(accuracies)
    assert score == pytest.approx(1.73 / 6) and partial is False
    score, partial = chat.chatcore({"ARC-Easy": 0.55, "GSM8K": 0.05})
    assert score == pytest.approx((0.4 + 0.05) / 2) and partial is True
    assert chat.chatcore({"MMLU": 0.25})[0] == pytest.approx(0.0)  # chance scores 0
    with pytest.raises(chat.ChatEvalError):
        chat.chatcore({"HellaSwag": 0.5})


# ---- the launcher -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer):
    """A base directory as training would leave it: the tokenizer and an sft checkpoint (random
    weights of a 2-layer model: what is evaluated does not matter here, only that it loads)."""
    from nanochat_jax.checkpoint import Checkpointer
    from nanochat_jax.config import apply_override, load_config

    base = tmp_path_factory.mktemp("base")
    tokenizer.save(base / "tokenizer")
    config = load_config("tiny")
    for key, value in (("model.vocab_size", "512"), ("model.depth", "2"), ("model.sequence_len", "256")):
        apply_override(config, key, value)
    params = random_params(model_lib.GPTConfig.from_config(config.model), 2)
    with Checkpointer(base / "checkpoints" / "sft" / "tiny") as checkpointer:
        checkpointer.save(7, params, {"count": np.zeros((), np.int32)}, {}, config, {}, force=True)
        checkpointer.wait()
    return base


def chat_eval(base: Path, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user has
    env["NANOCHAT_BASE_DIR"] = str(base)
    return subprocess.run([sys.executable, "-m", "launch.chat_eval", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_launcher_evaluates_all_six_tasks_and_the_behaviour_and_reports(base_dir):
    """With the config's defaults: tiny's task data (the package's offline subsets) and its problems
    per task (here overridden to 3, for the tasks and for each kind of the behaviour figures)."""
    proc = chat_eval(base_dir, "--config.eval.chat_max_problems=3", "--max-new-tokens=8", "--batch-size=4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["source"] == "sft" and result["step"] == 7 and result["partial"] is False
    assert list(result["accuracy"]) == list(chat.TASKS) and result["problems"] == dict.fromkeys(chat.TASKS, 3)
    assert all(acc in (0, 1 / 3, 2 / 3, 1) for acc in result["accuracy"].values())
    assert result["chatcore"] == pytest.approx(chat.chatcore(result["accuracy"])[0])
    figures = result["behaviour"]
    assert figures["max_new_tokens"] == 128 and list(figures["kinds"]) == ["conversation", "arithmetic", "spelling"]
    assert all(k["prompts"] + k["too_long"] == 3 for k in figures["kinds"].values())
    assert 0 <= figures["ends_share"] <= 1 and figures["arithmetic_accuracy"] in (0, 1 / 3, 2 / 3, 1)
    section = (base_dir / "report" / "chat-evaluation-sft.md").read_text()
    for name in (*chat.TASKS, "ChatCORE", "ends with <|assistant_end|> within 128 tokens",
                 "arithmetic calls the calculator", "arithmetic accuracy", "spelling accuracy"):
        assert f"- {name}: " in section
    assert "| arithmetic | " in section


def test_launcher_missing_checkpoint_and_bad_flags_are_clear_errors(tmp_path):
    proc = chat_eval(tmp_path, "-i", "mid", f"--data-dir={SHARED / 'datasets'}")
    assert proc.returncode == 1 and "no mid checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    from launch.chat_eval import main  # flags are checked before anything loads
    with pytest.raises(SystemExit, match=r"unknown task\(s\) HellaSwag"):
        main(["-a", "ARC-Easy|HellaSwag"])
    with pytest.raises(SystemExit, match="multiple of the 8 ways"):
        main(["--batch-size=12"])
    with pytest.raises(SystemExit, match=r"--max-problems \(default: eval.chat_max_problems\) must be >= 1"):
        main(["--config.eval.chat_max_problems=0"])
