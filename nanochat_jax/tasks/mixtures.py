"""The data of each post-training stage: which tasks, how many of each, in what mixture.

Two recipes, chosen by `cfg.chat.data_dir`:

- nanochat's own (any value but "offline"): SmolTalk, MMLU auxiliary_train, GSM8K, ARC and the
  generated spelling and identity tasks, with nanochat's sizes, read from
  `configured_data_dir(cfg.chat.data_dir)` (a folder, else `$NANOCHAT_TASK_DATA`, else downloaded
  once). nanochat's `identity_conversations.jsonl` has no download here, so both recipes use the
  project's generated `IdentityConversations` (1,000, about the size of nanochat's file).
- "offline": the subsets the package ships (`tasks/offline/`, made by `launch.make_offline_tasks`)
  and tasks the project generates, each standing in for a nanochat dataset: ChitChat for
  SmolTalk, OpenBookQA/CommonsenseQA/Social IQa with ARC train for MMLU's auxiliary_train,
  arithmetic word problems with calculator calls for GSM8K. Sized for the tiny config on 2 CPU
  cores: midtraining 3,300 conversations, about 340K tokens with a 4,096-token tokenizer of the
  demo corpus (val 451, about 75K); SFT 1,200 conversations; RL 160 problems, 128 to test.
  The shipped GSM8K test subset is for evaluation only and no mixture here uses it.

Each function builds only its own stage's tasks, and reads (or downloads) their data then.
"""
from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.base import Task, TaskMixture
from nanochat_jax.tasks.chitchat import ChitChat
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.mc_train import SOURCES as MC_TRAIN_SOURCES
from nanochat_jax.tasks.mc_train import MultipleChoiceTrain
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.smoltalk import SmolTalk
from nanochat_jax.tasks.sources import OFFLINE, configured_data_dir
from nanochat_jax.tasks.spelling import SimpleSpelling, SpellingBee
from nanochat_jax.tasks.synthetic import ArithmeticRL, ArithmeticWordProblems, IdentityConversations

IDENTITY_SIZE = 1000


def _offline(cfg) -> bool:
    return cfg.chat.data_dir == OFFLINE


def mid_tasks(cfg) -> tuple[Task, Task]:
    """(train, val) for midtraining: every token of every conversation is trained on."""
    data_dir = configured_data_dir(cfg.chat.data_dir)
    if _offline(cfg):
        # about 340K tokens: one epoch is ~80 steps of tiny's 4,096 tokens
        identity = IdentityConversations(size=150)
        train = [ChitChat("train", data_dir=data_dir, stop=450),
                 *(MultipleChoiceTrain(source, data_dir=data_dir, stop=150) for source in MC_TRAIN_SOURCES),
                 ARC("ARC-Easy", "train", data_dir=data_dir, stop=200),
                 ARC("ARC-Challenge", "train", data_dir=data_dir, stop=100),
                 ArithmeticWordProblems(size=600), identity, identity,
                 SimpleSpelling(size=1000, data_dir=data_dir), SpellingBee(size=200, data_dir=data_dir)]
        val = [ChitChat("val", data_dir=data_dir), MMLU("all", "test", data_dir=data_dir, stop=200),
               ArithmeticWordProblems(size=150, split="test")]
        return TaskMixture(train), TaskMixture(val)
    identity = IdentityConversations(size=IDENTITY_SIZE)
    train = [SmolTalk("train", data_dir=data_dir), MMLU("auxiliary_train", "train", data_dir=data_dir),
             GSM8K("main", "train", data_dir=data_dir), identity, identity,
             SimpleSpelling(size=200_000, data_dir=data_dir), SpellingBee(size=80_000, data_dir=data_dir)]
    val = [SmolTalk("test", data_dir=data_dir), MMLU("all", "test", data_dir=data_dir, stop=5200),
           GSM8K("main", "test", data_dir=data_dir, stop=420)]
    return TaskMixture(train), TaskMixture(val)


def sft_tasks(cfg) -> tuple[Task, Task]:
    """(train, val) for SFT: one conversation per row, only the assistant's tokens trained on."""
    data_dir = configured_data_dir(cfg.chat.data_dir)
    if _offline(cfg):
        train = [ARC("ARC-Easy", "train", data_dir=data_dir, stop=150),
                 ARC("ARC-Challenge", "train", data_dir=data_dir, stop=75),
                 ArithmeticWordProblems(size=350), ChitChat("train", data_dir=data_dir, stop=475),
                 IdentityConversations(size=50), SimpleSpelling(size=50, data_dir=data_dir),
                 SpellingBee(size=50, data_dir=data_dir)]
        return TaskMixture(train), ChitChat("val", data_dir=data_dir)
    train = [ARC("ARC-Easy", "train", data_dir=data_dir), ARC("ARC-Challenge", "train", data_dir=data_dir),
             GSM8K("main", "train", data_dir=data_dir), SmolTalk("train", data_dir=data_dir, stop=10_000),
             IdentityConversations(size=IDENTITY_SIZE), SimpleSpelling(size=300, data_dir=data_dir),
             SpellingBee(size=300, data_dir=data_dir)]
    return TaskMixture(train), SmolTalk("test", data_dir=data_dir)


def rl_tasks(cfg) -> tuple[Task, Task]:
    """(train, test) for RL: verifiable tasks, each with `reward(conversation, completion)`."""
    if _offline(cfg):
        return ArithmeticRL(size=160), ArithmeticRL(size=128, split="test")
    data_dir = configured_data_dir(cfg.chat.data_dir)
    return GSM8K("main", "train", data_dir=data_dir), GSM8K("main", "test", data_dir=data_dir)


def mc_eval_tasks(cfg) -> dict[str, Task]:
    """SFT's periodic multiple choice accuracy, as nanochat's: MMLU and ARC-Easy, test splits (the
    shipped subsets offline)."""
    data_dir = configured_data_dir(cfg.chat.data_dir)
    return {"MMLU": MMLU("all", "test", data_dir=data_dir), "ARC-Easy": ARC("ARC-Easy", "test", data_dir=data_dir)}
