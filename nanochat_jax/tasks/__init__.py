"""nanochat's tasks: evaluation benchmarks and chat training data as conversations.

Each task is a sliceable list of conversation dicts that knows how to judge a completion
(`base.Task`); `TaskMixture` and `TaskSequence` combine them. Data comes from a local folder or
is downloaded once into the cache (`sources`).
"""
from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.base import Task, TaskMixture, TaskSequence, render_mc
from nanochat_jax.tasks.custom import CustomJSON
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.humaneval import HumanEval
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.smoltalk import SmolTalk
from nanochat_jax.tasks.sources import TaskDataError
from nanochat_jax.tasks.spelling import SimpleSpelling, SpellingBee
from nanochat_jax.tasks.synthetic import ArithmeticRL, ArithmeticWordProblems, IdentityConversations

__all__ = ["ARC", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "SimpleSpelling", "SmolTalk", "CustomJSON",
           "IdentityConversations", "ArithmeticWordProblems", "ArithmeticRL", "Task", "TaskMixture", "TaskSequence",
           "TaskDataError", "render_mc"]
