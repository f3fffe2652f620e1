"""nanochat's tasks: evaluation benchmarks and chat training data as conversations.

Each task is a sliceable list of conversation dicts that knows how to judge a completion
(`base.Task`); `TaskMixture` and `TaskSequence` combine them. Data comes from a local folder, the
subsets the package ships (`offline/`) or is downloaded once into the cache (`sources`);
`mixtures` says which tasks each post-training stage trains and validates on.
"""
from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.base import Task, TaskMixture, TaskSequence, render_mc
from nanochat_jax.tasks.chitchat import ChitChat
from nanochat_jax.tasks.custom import CustomJSON
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.humaneval import HumanEval
from nanochat_jax.tasks.mc_train import MultipleChoiceTrain
from nanochat_jax.tasks.mixtures import mc_eval_tasks, mid_tasks, rl_tasks, sft_tasks
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.smoltalk import SmolTalk
from nanochat_jax.tasks.sources import TaskDataError
from nanochat_jax.tasks.spelling import SimpleSpelling, SpellingBee
from nanochat_jax.tasks.synthetic import ArithmeticRL, ArithmeticWordProblems, IdentityConversations

__all__ = ["ARC", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "SimpleSpelling", "SmolTalk", "CustomJSON",
           "IdentityConversations", "ArithmeticWordProblems", "ArithmeticRL", "ChitChat", "MultipleChoiceTrain",
           "Task", "TaskMixture", "TaskSequence", "TaskDataError", "render_mc",
           "mid_tasks", "sft_tasks", "rl_tasks", "mc_eval_tasks"]
