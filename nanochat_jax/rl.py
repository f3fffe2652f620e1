"""Reinforcement learning on a task with a verifiable answer: nanochat's chat_rl, two bugs fixed.

Each step takes `examples_per_step` questions of the training split, samples `num_samples`
answers to each through the engine (calculator on; the rows of all questions decode together),
rewards each answer with the task's judge and gives it the advantage A = r - mean(r of its
question's answers): REINFORCE with a per-question mean baseline, no std division, no KL, no
ratio or clipping (strictly on-policy, one update per batch of answers).

Training rows are nanochat's: prompt + the tokens the model produced, the targets -1 on the
prompt, on tool outputs the engine forced and on padding. Fixed from nanochat: the stop token
the model sampled (`<|assistant_end|>`, or a `<|bos|>`) is the last target of its row, so stopping
is reinforced as any other action is (nanochat issue #810 dropped it), and every sample draws its
own first token (the engine does). Each token's weight carries nanochat's normalisation: with a
"pass" the `device_batch_size` consecutive answers of one question that nanochat runs in one
forward pass (see `pass_size`), weight = A / (valid tokens in the pass x passes in the step), so the train step's
sum of weight x cross-entropy is minus nanochat's objective. Rows are padded to the smallest of a
few widths that holds the step's longest, so a step compiles once per width, not per length.
"""
import copy
import dataclasses
import importlib
import time

import numpy as np

from nanochat_jax import sharding
from nanochat_jax.conversation import render_for_completion
from nanochat_jax.engine import Engine, bucket_sizes

EVAL_SEED = 2**31  # pass@k draws with seeds from here; training's (seed + step x examples) stay below


def load_task(spec: str, split: str):
    """A task of one's own, "package.module:Class", built as Class(split=split); it needs
    `reward(conversation, completion)` (every `tasks.Task` has it)."""
    module, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot load the RL task {spec!r} (expected module:Class): {err}") from None
    return cls(split=split)


@dataclasses.dataclass
class Rollout:
    """One sampled answer. `completion`: the tokens after the prompt, up to but without the stop
    token; `sampled`: 1 where the model drew the token, 0 where the calculator forced it; `stop`:
    the stop token the model drew, None if it ran out of tokens first."""
    prompt: list[int]
    completion: list[int]
    sampled: list[int]
    stop: int | None
    reward: float = 0.0

    @property
    def tokens(self) -> list[int]:
        """The training sequence: prompt, completion and the sampled stop token."""
        return self.prompt + self.completion + ([] if self.stop is None else [self.stop])

    @property
    def trained(self) -> list[int]:
        """Per token of `tokens`, 1 where it is a target (what the model sampled), else 0."""
        return [0] * len(self.prompt) + self.sampled + ([] if self.stop is None else [1])


def sample_rollouts(engine, prompts: list[list[int]], num_samples: int, *, max_tokens: int, temperature: float,
                    top_k: int | None, seed: int, max_rows: int | None = None) -> tuple[list[list[Rollout]], int]:
    """`num_samples` rollouts of each prompt, all prompts decoding together (at most `max_rows`
    rows at once); sample j of prompt i draws with the keys (seed + i, j, step). Also returns the
    number of tokens produced (sampled, forced and stop tokens)."""
    results = engine.generate_many(prompts, num_samples, max_tokens=max_tokens, temperature=temperature,
                                   top_k=top_k, seed=seed, max_rows=max_rows, keep_stop=True)
    stops = set(engine.stop_tokens)
    groups, produced = [], 0
    for prompt, (rows, masks) in zip(prompts, results):
        n = len(prompt)
        group = []
        for row, mask in zip(rows, masks):
            completion, sampled, stop = row[n:], mask[n:], None
            if completion and completion[-1] in stops:  # the row ended on a stop token it sampled
                completion, sampled, stop = completion[:-1], sampled[:-1], completion[-1]
            group.append(Rollout(list(prompt), completion, sampled, stop))
            produced += len(completion) + (stop is not None)
        groups.append(group)
    return groups, produced


def advantages(rewards: np.ndarray) -> np.ndarray:
    """(questions, samples) rewards -> each minus its question's mean reward."""
    rewards = np.asarray(rewards, np.float64)
    return rewards - rewards.mean(axis=1, keepdims=True)


@dataclasses.dataclass
class StepBatch:
    """A step's training rows as the train step takes them, each (accum, micro, width)."""
    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray

    @property
    def arrays(self):
        return self.inputs, self.targets, self.weights


def step_batch(groups: list[list[Rollout]], advantage: np.ndarray, *, device_batch_size: int, questions: int,
               micro: int, widths, pad: int) -> StepBatch:
    """The training rows of a step's rollouts, weighted with nanochat's normalisation.

    `groups[q]` holds question q's answers and `advantage[q]` their advantages; `questions` is
    the step's number of questions (questions without rollouts, whose prompt did not fit, still
    count in nanochat's normaliser). Rows go `micro` to a micro-batch, padded with empty rows
    (no targets) to whole micro-batches, and to the smallest of `widths` holding the longest."""
    samples = {len(g) for g in groups if g}
    if samples and (len(samples) > 1 or next(iter(samples)) % device_batch_size):
        raise ValueError(f"every question needs the same number of answers, a multiple of device_batch_size "
                         f"{device_batch_size}; got {sorted(samples)}")
    num_samples = next(iter(samples), device_batch_size)
    total_passes = questions * (num_samples // device_batch_size)
    rows = [(r, float(a)) for group, adv in zip(groups, advantage) for r, a in zip(group, adv)]
    longest = max((len(r.tokens) - 1 for r, _ in rows), default=1)
    width = next((w for w in sorted(widths) if w >= longest), None)
    if width is None:
        raise ValueError(f"a row of {longest} positions is longer than the widest of {sorted(widths)}")
    count = max(1, -(-len(rows) // micro)) * micro
    inputs = np.full((count, width), pad, np.int32)
    targets = np.full((count, width), -1, np.int32)
    weights = np.zeros((count, width), np.float32)
    for i, (rollout, _) in enumerate(rows):
        tokens, trained = np.array(rollout.tokens, np.int32), np.array(rollout.trained, bool)
        inputs[i, :len(tokens) - 1] = tokens[:-1]
        targets[i, :len(tokens) - 1] = np.where(trained[1:], tokens[1:], -1)
    for start in range(0, len(rows), device_batch_size):  # a pass never straddles two questions
        valid = max(1, int(np.sum(targets[start:start + device_batch_size] >= 0)))
        for i in range(start, min(start + device_batch_size, len(rows))):
            weights[i] = np.where(targets[i] >= 0, rows[i][1] / (valid * total_passes), 0.0)
    shape = (count // micro, micro, width)
    return StepBatch(inputs.reshape(shape), targets.reshape(shape), weights.reshape(shape))


def row_widths(sequence_len: int) -> tuple[int, ...]:
    """The widths training rows are padded to: the engine's buckets (64, 128, ..., the context)."""
    return bucket_sizes(sequence_len)


def question_indices(step: int, examples_per_step: int, num_examples: int) -> list[int]:
    """The training problems of a step: the next `examples_per_step` in order, cycling over the
    split once per epoch. The step alone says where the data is, so resuming needs nothing else."""
    return [(step * examples_per_step + i) % num_examples for i in range(examples_per_step)]


@dataclasses.dataclass
class StepRollouts:
    """A step's rollouts and figures: `groups[q]` answers question q (empty if its prompt left no
    room in the context)."""
    groups: list[list[Rollout]]
    mean_reward: float
    tokens: int
    seconds: float
    skipped: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def rollout_step(engine, task, step: int, rl_cfg, *, seed: int, max_rows: int | None = None,
                 num_examples: int | None = None) -> StepRollouts:
    """Sample and reward the answers of step `step`'s questions, drawn from the task's first
    `num_examples` problems (None: all); question i of the step draws with seed
    `seed + step x examples_per_step + i`, so every sample's draws follow from (step, i, j)."""
    start = time.perf_counter()
    count = len(task) if num_examples is None else min(num_examples, len(task))
    indices = question_indices(step, rl_cfg.examples_per_step, count)
    conversations = [task[i] for i in indices]
    prompts = [render_for_completion(engine.tokenizer, c) for c in conversations]
    fits = [q for q, p in enumerate(prompts) if len(p) < engine.cfg.sequence_len]
    sampled, tokens = sample_rollouts(
        engine, [prompts[q] for q in fits], rl_cfg.num_samples, max_tokens=rl_cfg.max_new_tokens,
        temperature=rl_cfg.temperature, top_k=rl_cfg.top_k or None, max_rows=max_rows,
        seed=(seed + step * rl_cfg.examples_per_step) % 2**31) if fits else ([], 0)
    groups = [[] for _ in prompts]
    for q, group in zip(fits, sampled):
        for rollout in group:
            rollout.reward = float(task.reward(conversations[q], engine.tokenizer.decode(rollout.completion)))
        groups[q] = group
    rewards = [r.reward for g in groups for r in g]
    return StepRollouts(groups, float(np.mean(rewards)) if rewards else 0.0, tokens, time.perf_counter() - start,
                        len(prompts) - len(fits))


def train_batch(rollouts: StepRollouts, rl_cfg, *, micro: int, widths, pad: int) -> StepBatch:
    """The step's training rows from its rollouts (see `step_batch`)."""
    kept = [g for g in rollouts.groups if g]
    adv = advantages([[r.reward for r in g] for g in kept]) if kept else np.zeros((0, 0))
    return step_batch(kept, adv, device_batch_size=pass_size(rl_cfg), questions=len(rollouts.groups),
                      micro=micro, widths=widths, pad=pad)


def pass_size(rl_cfg) -> int:
    """Answers in one of nanochat's forward passes, its unit of normalisation: device_batch_size
    of one question's answers, or all of them when device_batch_size is larger (which nanochat
    refuses; here the forward passes then hold several questions, and each keeps its own pass)."""
    return min(rl_cfg.device_batch_size, rl_cfg.num_samples)


def pass_at_k(engine, task, *, num_problems: int, num_samples: int, max_tokens: int, temperature: float,
              top_k: int | None, max_rows: int | None = None, seed: int = EVAL_SEED) -> dict[str, float]:
    """{"pass@1": ..., "pass@num_samples": ...} on the task's first `num_problems` problems, all
    decoding together: pass@k is the share of problems with a right answer among their first k
    samples. A problem whose prompt leaves no room to answer counts as failed."""
    count = min(num_problems, len(task))
    if count < 1 or num_samples < 1:
        raise ValueError(f"pass@k needs at least one problem and one sample, got {count} and {num_samples}")
    conversations = [task[i] for i in range(count)]
    prompts = [render_for_completion(engine.tokenizer, c) for c in conversations]
    fits = [i for i, p in enumerate(prompts) if len(p) < engine.cfg.sequence_len]
    passed = np.zeros((count, num_samples), bool)
    if fits:
        groups, _ = sample_rollouts(engine, [prompts[i] for i in fits], num_samples, max_tokens=max_tokens,
                                    temperature=temperature, top_k=top_k, seed=seed, max_rows=max_rows)
        for i, group in zip(fits, groups):
            passed[i] = [task.reward(conversations[i], engine.tokenizer.decode(r.completion)) > 0 for r in group]
    solved = np.cumsum(passed, axis=1) > 0
    return {f"pass@{k}": float(solved[:, k - 1].mean()) for k in range(1, num_samples + 1)}


def training_config(cfg):
    """The run's config with RL's optimizer settings: cfg.train's learning rates times
    rl.init_lr_frac, decaying linearly to 0 over the run, and Muon's momentum held at its final
    value (nanochat's RL has no momentum warmup)."""
    cfg = copy.deepcopy(cfg)
    t = cfg.train
    t.init_lr_frac = cfg.rl.init_lr_frac
    t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac = 0.0, 1.0, 0.0
    t.muon_momentum_start = t.muon_momentum
    return cfg


def check_settings(rl_cfg) -> None:
    """Refuse RL settings the algorithm cannot run with, naming the field."""
    r = rl_cfg
    for name in ("examples_per_step", "num_samples", "device_batch_size", "max_new_tokens", "num_epochs",
                 "eval_examples", "eval_samples"):
        if r[name] < 1:
            raise ValueError(f"rl.{name} must be at least 1, got {r[name]}")
    if r.num_samples % pass_size(r):
        raise ValueError(f"rl.num_samples {r.num_samples} must be a multiple of rl.device_batch_size "
                         f"{r.device_batch_size} (nanochat's passes hold answers of one question) or at most it")
    if r.temperature < 0 or r.top_k < 0:
        raise ValueError(f"rl.temperature and rl.top_k must be >= 0, got {r.temperature} and {r.top_k}")


def num_steps(rl_cfg, num_examples: int) -> int:
    """nanochat's horizon: num_epochs x training problems // examples_per_step."""
    steps = rl_cfg.num_epochs * num_examples // rl_cfg.examples_per_step
    if steps < 1:
        raise ValueError(f"{num_examples} training problems x {rl_cfg.num_epochs} epochs make no step of "
                         f"rl.examples_per_step={rl_cfg.examples_per_step}")
    return steps


class RolloutBatches:
    """The train loop's on-policy batch source (`train.fit`): `observe(params)` hands the engine
    the newest weights, `next()` samples the step's answers with them and returns the placed
    (inputs, targets, weights). Its state is the step, so a resumed run draws exactly the answers
    the uninterrupted one would have."""

    def __init__(self, training, tokenizer, task, rl_cfg, *, seed: int, num_examples: int | None = None,
                 max_rows: int | None = None, log=print):
        self.training, self.tokenizer, self.task, self.rl = training, tokenizer, task, rl_cfg
        self.seed, self.max_rows, self.log = seed, max_rows, log
        self.num_examples = len(task) if num_examples is None else min(num_examples, len(task))
        self.micro = rl_cfg.device_batch_size * sharding.batch_shards(training.mesh, training.rules)
        self.widths = row_widths(training.model_cfg.sequence_len)
        self.pad = tokenizer.encode_special("<|assistant_end|>")
        self.engine, self.step, self.last = None, 0, None
        self.tokens, self.seconds = 0, 0.0  # rollouts of this process after its first step (compilation)

    def engine_for(self, params):
        """The engine, decoding with `params` (built on first use; new weights compile nothing)."""
        if self.engine is None:
            self.engine = Engine(self.training.graphdef, params, self.training.model_cfg, self.tokenizer)
        else:
            self.engine.set_params(params)
        return self.engine

    def observe(self, params) -> None:
        self.engine_for(params)

    def __iter__(self):
        return self

    def __next__(self):
        if self.engine is None:
            raise RuntimeError("RolloutBatches needs observe(params) before the first batch")
        rollouts = rollout_step(self.engine, self.task, self.step, self.rl, seed=self.seed, max_rows=self.max_rows,
                                num_examples=self.num_examples)
        batch = train_batch(rollouts, self.rl, micro=self.micro, widths=self.widths, pad=self.pad)
        if self.last is not None:
            self.tokens, self.seconds = self.tokens + rollouts.tokens, self.seconds + rollouts.seconds
        self.last, self.step = rollouts, self.step + 1
        self.log(f"step {self.step:05d} | mean reward {rollouts.mean_reward:.4f} | rollouts: {rollouts.tokens:,} "
                 f"tokens in {rollouts.seconds:.1f} s ({rollouts.tokens_per_s:,.0f} tok/s)"
                 f"{f', {rollouts.skipped} prompts too long' if rollouts.skipped else ''} | rows of {batch.inputs.shape[2]}")
        place = lambda x: sharding.put_global_batch(x, self.training.batch_sharding)
        return tuple(place(x) for x in batch.arrays)

    def step_figures(self) -> dict:
        r = self.last
        return {"mean_reward": r.mean_reward, "rollout_tokens": r.tokens, "rollout_s": r.seconds,
                "rollout_tokens_per_s": r.tokens_per_s, "prompts_too_long": r.skipped}

    @property
    def tokens_per_s(self) -> float | None:
        """Rollout throughput of this process's steps after its first (which compiles)."""
        return self.tokens / self.seconds if self.seconds else None

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

