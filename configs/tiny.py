"""tiny: a CPU demo model that trains in seconds per step on 2 cores and still writes English.

Four layers of width 256 with 64-wide heads (4 heads), a 4,096-token vocabulary and 256-token
context; 16 x 256 = 4,096 tokens per step, no gradient accumulation on one device. Post-training
runs offline on small mixtures (nanochat_jax/tasks/mixtures.py) sized for minutes on 2 cores.
"""
from configs.base import base_config


def get_config():
    c = base_config(4)
    c.name = "tiny"
    c.model.head_dim = 64
    c.model.vocab_size = 4096  # and the tokenizer's
    c.data.dir = "demo"
    c.data.val_shard = "shard_00008.parquet"
    c.data.num_workers = 0                  # 2 cores: SentencePiece already uses both
    c.tokenizer.max_chars = 100_000_000
    c.model.sequence_len = 256
    c.model.loss_chunk = 0
    c.train.device_batch_size = 16
    c.train.total_batch_size = 4096
    c.train.num_iterations = 300
    c.train.muon_momentum_warmup_steps = 50
    c.train.eval_every = 50
    c.train.eval_tokens = 20 * 4096
    c.train.sample_every = 100
    c.train.checkpoint_every = 50
    c.train.core_max_per_task = 0           # no CORE in training: even at 11 per task (the fewest that
                                            # 10-shot tasks allow) it takes minutes on 2 cores
    c.eval.core_max_per_task = 11           # base_eval (the speedrun's CORE stage) at that minimum
    c.eval.core_tokens_per_device = 2048    # less padding in a task's last pass per length bucket
    c.eval.chat_max_problems = 64           # per chat task, for each chat_eval stage of the speedrun
    # post-training on the data the package ships and the tasks it generates: no network
    c.chat.data_dir = "offline"
    c.mid.eval_every = 50                   # one epoch of the offline mixture is about 150 steps
    c.mid.eval_tokens = 16 * 4096
    c.mid.checkpoint_every = 25
    c.sft.device_batch_size = 8
    c.sft.examples_per_step = 16            # 1,200 conversations: 75 steps
    c.sft.eval_every = 25
    c.sft.eval_steps = 8
    c.sft.mc_every = 25
    c.sft.mc_max_problems = 100
    c.sft.checkpoint_every = 25
    c.rl.examples_per_step = 8              # 160 generated problems: 20 steps
    c.rl.num_samples = 8
    c.rl.device_batch_size = 16
    c.rl.max_new_tokens = 128
    c.rl.eval_every = 10
    c.rl.eval_examples = 64
    c.rl.eval_samples = 4
    c.rl.save_every = 10
    return c
