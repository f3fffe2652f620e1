"""Tasks: datasets of conversations that know how to judge a completion, and their combinators.

A conversation is `{"messages": [...]}` as `nanochat_jax.conversation` renders it; the last
message is the assistant's reference answer. Categorical tasks (multiple choice) add `"letters"`,
the answer letters the evaluation may pick from. As in nanochat, every task takes `start`, `stop`
and `step`, a view of its examples with Python's slice semantics, so `MMLU(..., stop=5200)` is
its first 5,200 (shuffled) problems.
"""
import bisect
import itertools
import random

import numpy as np

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MIXTURE_SEED = 42


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


class Task:
    """A sliceable dataset of conversations. Subclasses give `num_examples`, `get_example` and,
    when there is a right answer, `evaluate` and `eval_type` ("categorical" or "generative")."""

    eval_type: str

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise ValueError(f"stop must be >= start ({start}), got {stop}")
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} has no right answer to judge a completion by")

    def reward(self, conversation: dict, completion: str) -> float:
        """RL's reward: 1.0 for a completion `evaluate` accepts, else 0.0 (no format reward, as nanochat)."""
        return float(self.evaluate(conversation, completion))

    def _view(self) -> range:
        return range(self.num_examples())[self.start:self.stop:self.step]

    def __len__(self) -> int:
        return len(self._view())

    def __getitem__(self, index: int) -> dict:
        return self.get_example(self._view()[index])


class MultipleChoice(Task):
    """Categorical: the reference is the gold letter, and the evaluation's answer is a letter."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        if completion not in conversation["letters"]:
            raise ValueError(f"the answer to a multiple choice question must be one of its letters "
                             f"{conversation['letters']}, got {completion!r}")
        return completion == conversation["messages"][-1]["content"]


def render_mc(question: str, letters, choices) -> str:
    """nanochat's multiple choice prompt. The letter follows its choice with no space after `=`,
    so it is the same token as the bare letter the assistant answers with (small models care)."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    return "".join(lines) + "\nRespond only with the letter of the correct answer."


def multiple_choice(question: str, letters, choices, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": answer}],
            "letters": list(letters), **extra}


class _Concatenation(Task):
    """The examples of several tasks, numbered one after another."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self._ends = list(itertools.accumulate(len(task) for task in self.tasks))

    def num_examples(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _locate(self, index: int) -> dict:
        which = bisect.bisect_right(self._ends, index)
        return self.tasks[which][index - (self._ends[which - 1] if which else 0)]


class TaskSequence(_Concatenation):
    """All examples of the first task, then of the second, ...: a curriculum."""

    def get_example(self, index: int) -> dict:
        return self._locate(index)


class TaskMixture(_Concatenation):
    """All examples of all tasks in one fixed shuffled order, so that training sees them mixed
    throughout. nanochat shuffles its list of (task, index) pairs with `random.Random(42)`; the
    permutation `shuffle` makes depends only on the list's length, so shuffling the positions
    0..N-1 of the concatenation gives the same order. Pass a task twice to oversample it."""

    def __init__(self, tasks, **kwargs):
        super().__init__(tasks, **kwargs)
        order = list(range(self.num_examples()))
        random.Random(MIXTURE_SEED).shuffle(order)
        self._order = np.array(order, dtype=np.int64)

    def get_example(self, index: int) -> dict:
        return self._locate(int(self._order[index]))
