"""Chat evaluation: nanochat's six chat tasks and ChatCORE, many problems in flight at once.

Categorical tasks (ARC, MMLU) need no sampling: a batch of prompts goes through one forward pass
and each problem's answer is the allowed letter whose logit at the last prompt position is
largest; the other tokens of the vocabulary are never candidates, so the model always answers
with a letter (as nanochat, this makes the task easier than asking it to write one). Prompts are
sorted by length and right-padded to a power-of-two bucket, so the pass compiles once per bucket;
the attention is causal, so padding after a prompt never changes its logits. As for CORE, a prompt
longer than the model's training context is scored whole (rotary positions are computed, not
tabulated), never cropped; only generation needs room in the context.

Generative tasks (GSM8K, HumanEval, SpellingBee) sample `num_samples` completions per problem
through the engine (calculator on; greedy by default) with many problems decoding together, and a
problem passes if any of its samples passes (pass@k). Judging runs in a thread pool while the next
problems generate: HumanEval's judge is a sandboxed subprocess per completion.

ChatCORE is the mean over tasks of the accuracy centred on its random baseline,
(acc - b) / (1 - b): b = 1/4 for the four-way multiple choice tasks, 0 for the open-ended ones.
nanochat computes it only when all six ran; here it is computed over what ran and marked partial.
"""
import concurrent.futures
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from nanochat_jax import sharding, tasks
from nanochat_jax.conversation import render_for_completion
from nanochat_jax.model import softcap_logits

# name: (accuracy of answering at random, the task given a local data folder or None to download)
TASKS = {
    "ARC-Easy": (0.25, lambda data_dir: tasks.ARC("ARC-Easy", "test", data_dir=data_dir)),
    "ARC-Challenge": (0.25, lambda data_dir: tasks.ARC("ARC-Challenge", "test", data_dir=data_dir)),
    "MMLU": (0.25, lambda data_dir: tasks.MMLU("all", "test", data_dir=data_dir)),
    "GSM8K": (0.0, lambda data_dir: tasks.GSM8K("main", "test", data_dir=data_dir)),
    "HumanEval": (0.0, lambda data_dir: tasks.HumanEval(data_dir=data_dir)),
    "SpellingBee": (0.0, lambda data_dir: tasks.SpellingBee(size=256, split="test", data_dir=data_dir)),
}
MIN_BUCKET = 64


class ChatEvalError(ValueError):
    """A task or tokenizer the evaluation cannot score."""


def load_task(name: str, data_dir=None):
    if name not in TASKS:
        raise ChatEvalError(f"unknown task {name!r}; the chat tasks are {', '.join(TASKS)}")
    return TASKS[name][1](data_dir)


@dataclasses.dataclass
class TaskResult:
    """`too_long`: generative problems whose prompt left no room to answer in the model's context
    (counted as failed)."""
    name: str
    passed: int
    problems: int
    seconds: float
    too_long: int = 0

    @property
    def accuracy(self) -> float:
        return self.passed / self.problems

    @property
    def problems_per_s(self) -> float:
        return self.problems / self.seconds if self.seconds > 0 else float("inf")


def chatcore(accuracies: dict[str, float]) -> tuple[float, bool]:
    """(mean centred accuracy over the tasks given, partial: whether any of the six is missing)."""
    if not accuracies or set(accuracies) - set(TASKS):
        raise ChatEvalError(f"ChatCORE needs accuracies of {', '.join(TASKS)}; got {sorted(accuracies)}")
    baselines = {name: TASKS[name][0] for name in accuracies}
    centred = [(acc - baselines[name]) / (1 - baselines[name]) for name, acc in accuracies.items()]
    return sum(centred) / len(centred), len(accuracies) < len(TASKS)


def bucket_length(n: int) -> int:
    """The padded length of an `n`-token prompt: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def letter_token_ids(tokenizer, letters) -> list[int]:
    """The single token of each answer letter (encoded alone, with no space before it)."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ChatEvalError(f"answer letter {letter!r} encodes to {len(encoded)} tokens {encoded}; "
                                "categorical scoring needs each letter to be one token")
        ids.append(encoded[0])
    return ids


class LetterScorer:
    """Answers categorical problems: the allowed letter with the largest logit after the prompt.

    Batches of `batch_size` prompts (shortest first; the last batch is filled with padding rows)
    are padded with `<|bos|>` to their longest prompt's bucket. With a mesh, the batch is split
    over its batch axes (`batch_size` must be a multiple of their size) and the parameters stay
    where they are."""

    def __init__(self, graphdef, params, model_cfg, tokenizer, batch_size: int, mesh=None, rules=None):
        self.params, self.tokenizer, self.batch_size = params, tokenizer, batch_size
        self.context = model_cfg.sequence_len
        self.shardings = (None, None) if mesh is None else (
            sharding.batch_sharding(mesh, rules, ndim=2), sharding.batch_sharding(mesh, rules, ndim=1))

        @jax.jit
        def last_logits(params, tokens, last):
            """fp32 logits (B, vocab) at each row's position `last`; the head runs on those
            positions only, never on the whole (B, T, vocab)."""
            model = nnx.merge(graphdef, params)
            if mesh is None:
                hidden = model.hidden(tokens)
            else:
                with sharding.activation_rules(mesh, rules):
                    hidden = model.hidden(tokens)
            picked = hidden[jnp.arange(tokens.shape[0]), last]
            return softcap_logits(model.lm_head(picked), model.cfg.softcap)

        self.last_logits = last_logits

    def answers(self, prompts: list[list[int]], letters: list[list[str]], on_batch=None) -> list[str]:
        """The letter picked for each prompt among its `letters`; `on_batch(indices, answers)` is
        called after each batch (for progress)."""
        letter_ids = [letter_token_ids(self.tokenizer, options) for options in letters]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers, size = [None] * len(prompts), self.batch_size
        for start in range(0, len(order), size):
            indices = order[start:start + size]
            tokens = np.full((size, bucket_length(len(prompts[indices[-1]]))), self.tokenizer.bos_id, np.int32)
            last = np.zeros(size, np.int32)
            for row, i in enumerate(indices):
                tokens[row, :len(prompts[i])] = prompts[i]
                last[row] = len(prompts[i]) - 1
            tokens, last = (x if s is None else jax.device_put(x, s) for x, s in zip((tokens, last), self.shardings))
            logits = np.asarray(self.last_logits(self.params, tokens, last))
            for row, i in enumerate(indices):
                answers[i] = letters[i][int(np.argmax(logits[row, letter_ids[i]]))]
            if on_batch is not None:
                on_batch(indices, [answers[i] for i in indices])
        return answers


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How generative tasks sample: nanochat's defaults (greedy, 512 new tokens, top-k 50, one
    sample); `max_rows` rows decode together."""
    num_samples: int = 1
    max_tokens: int = 512
    temperature: float = 0.0
    top_k: int | None = 50
    max_rows: int = 32
    seed: int = 42


def fitting_problems(task, tokenizer, max_problems: int | None, room: int | None):
    """(conversations, prompts) of the task's first `max_problems` problems whose prompt has at
    most `room` tokens (None: any length), and how many did not fit."""
    count = len(task) if max_problems is None else min(len(task), max_problems)
    conversations = [task[i] for i in range(count)]
    prompts = [render_for_completion(tokenizer, c) for c in conversations]
    fits = [i for i, p in enumerate(prompts) if room is None or len(p) <= room]
    return [conversations[i] for i in fits], [prompts[i] for i in fits], count - len(fits)


class Progress(tqdm):
    """A problem counter showing the running accuracy (problems that did not fit count as failed)."""

    def __init__(self, name: str, total: int, failed: int):
        super().__init__(total=total, desc=name, unit="problem", initial=failed)
        self.passed = 0

    def record(self, outcomes) -> None:
        outcomes = list(outcomes)
        self.passed += sum(map(bool, outcomes))
        self.update(len(outcomes))
        if self.n:
            self.set_postfix(accuracy=f"{self.passed / self.n:.4f}")


def evaluate_categorical(name: str, task, scorer: LetterScorer, max_problems: int | None = None) -> TaskResult:
    """Accuracy of the scorer's letters on the task's first `max_problems` problems."""
    start = time.perf_counter()
    conversations, prompts, _ = fitting_problems(task, scorer.tokenizer, max_problems, room=None)
    with Progress(name, len(prompts), 0) as progress:
        scorer.answers(prompts, [c["letters"] for c in conversations], on_batch=lambda indices, answers: progress.record(
            task.evaluate(conversations[i], a) for i, a in zip(indices, answers)))
    return TaskResult(name, progress.passed, len(prompts), time.perf_counter() - start)


def passes(task, conversation, completions: list[str]) -> bool:
    """pass@k: the problem passes if any of its completions does."""
    return any(bool(task.evaluate(conversation, completion)) for completion in completions)


def evaluate_generative(name: str, task, engine, sampling: Sampling = Sampling(),
                        max_problems: int | None = None, judge_workers: int | None = None) -> TaskResult:
    """pass@`num_samples` on the task's first `max_problems` problems.

    Problems go to `engine.generate_many` a few row-batches at a time (the i-th problem that fits
    samples with seed `sampling.seed + i`; a row stops at the end of the context), and each
    problem's completions are judged in a thread pool while the next problems generate."""
    start, tok = time.perf_counter(), engine.tokenizer
    conversations, prompts, too_long = fitting_problems(task, tok, max_problems, engine.cfg.sequence_len - 1)
    per_call = 4 * max(1, sampling.max_rows // sampling.num_samples)
    with Progress(name, len(prompts) + too_long, too_long) as progress, \
            concurrent.futures.ThreadPoolExecutor(judge_workers or os.cpu_count()) as pool:
        pending = []
        for first in range(0, len(prompts), per_call):
            results = engine.generate_many(
                prompts[first:first + per_call], num_samples=sampling.num_samples, max_tokens=sampling.max_tokens,
                temperature=sampling.temperature, top_k=sampling.top_k, seed=sampling.seed + first,
                max_rows=sampling.max_rows)
            for i, (rows, _) in enumerate(results, start=first):
                completions = [tok.decode(row[len(prompts[i]):]) for row in rows]
                pending.append(pool.submit(passes, task, conversations[i], completions))
            done = {f for f in pending if f.done()}
            pending = [f for f in pending if f not in done]
            progress.record(f.result() for f in done)
        for future in concurrent.futures.as_completed(pending):
            progress.record([future.result()])
    return TaskResult(name, progress.passed, len(prompts) + too_long, time.perf_counter() - start, too_long)
