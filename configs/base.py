"""The one place every named config starts from: nanochat's d20 recipe, parameterised by depth.

A named config (`configs/d20.py`, `configs/tiny.py`, ...) calls `base_config(depth)` and changes
only what differs. Fields left as placeholders (None) are derived at use: model width, heads and
KV heads from depth, as nanochat does (dim = 64 * depth, heads = ceil(dim / head_dim)).
"""
from ml_collections import ConfigDict, FieldReference
from ml_collections.config_dict import placeholder


def base_config(depth: int) -> ConfigDict:
    c = ConfigDict()
    c.name = f"d{depth}"
    c.seed = 42

    vocab_size = FieldReference(65536)  # one value: the tokenizer's vocabulary is the model's

    c.data = ConfigDict()
    c.data.dir = ""                         # "" = $NANOCHAT_BASE_DIR/base_data, "demo" = bundled corpus
    c.data.val_shard = "shard_01822.parquet"  # the last FineWeb-Edu shard, always the val split
    c.data.num_workers = 4                  # tokenizer processes of the pretraining pipeline (0: in-process)

    c.tokenizer = ConfigDict()
    c.tokenizer.vocab_size = vocab_size
    c.tokenizer.doc_cap = 10000             # characters kept per document
    c.tokenizer.max_chars = 2_000_000_000   # stop reading after this many characters
    c.tokenizer.max_sentences = -1          # SentencePiece keeps a uniform sample of at most this many
                                            # 4096-char pieces; -1: as many as fit in half the RAM

    c.model = ConfigDict()
    c.model.depth = depth
    c.model.dim = placeholder(int)          # None -> 64 * depth
    c.model.head_dim = 128
    c.model.n_head = placeholder(int)       # None -> ceil(dim / head_dim)
    c.model.n_kv_head = placeholder(int)    # None -> n_head (GQA off, as in nanochat)
    c.model.vocab_size = vocab_size
    c.model.sequence_len = 2048
    c.model.rope_base = 10000.0
    c.model.softcap = 15.0
    c.model.compute_dtype = "auto"          # auto: bfloat16 on GPU/TPU, float32 on CPU
    c.model.attention = "auto"              # auto | xla | cudnn | pallas | mosaic (auto: cudnn on GPU, else xla)
    c.model.remat = "none"                  # none | dots | full: rematerialisation of each block
    c.model.loss_chunk = 256                # sequence positions per logits chunk in the loss (0: none)

    c.train = ConfigDict()
    c.train.device_batch_size = 32          # sequences per device per micro-batch
    c.train.total_batch_size = 524288       # tokens per optimizer step (2**19)
    c.train.num_iterations = -1             # horizon, first of these that is set wins:
    c.train.target_flops = -1.0             #   ... total training FLOPs
    c.train.target_param_data_ratio = 20.0  #   ... tokens = ratio * params (Chinchilla)
    c.train.embedding_lr = 0.2
    c.train.unembedding_lr = 0.004
    c.train.matrix_lr = 0.02
    c.train.weight_decay = 0.0
    c.train.adam_b1 = 0.8
    c.train.adam_b2 = 0.95
    c.train.adam_eps = 1e-10
    c.train.muon_momentum = 0.95
    c.train.muon_momentum_start = 0.85
    c.train.muon_momentum_warmup_steps = 300
    c.train.muon_ns_steps = 5
    c.train.init_lr_frac = 1.0
    c.train.warmup_ratio = 0.0
    c.train.warmdown_ratio = 0.2
    c.train.final_lr_frac = 0.0
    c.train.grad_clip = 0.0                 # global-norm clip; 0 disables (nanochat's never acted)
    c.train.eval_every = 250                # val bits-per-byte every this many steps (and at the end)
    c.train.eval_tokens = 20 * 524288       # ... over this many val tokens, always the same ones
    c.train.sample_every = 2000             # greedy samples of the fixed prompts (0: never)
    c.train.checkpoint_every = 1000         # steps between checkpoints (also at the end and on SIGTERM)
    c.train.checkpoint_keep = 3             # most recent checkpoints kept
    c.train.wandb_project = ""              # log to Weights & Biases when set (needs `pip install wandb`)
    c.train.core_every = 2000               # CORE every this many steps, never at step 0 (<= 0: only at the end)
    c.train.core_max_per_task = 500         # ... on at most this many examples per task (0: no CORE in training)

    c.eval = ConfigDict()
    c.eval.core_max_per_task = -1           # base_eval's examples per task (-1: all)
    c.eval.core_tokens_per_device = 8192    # padded tokens per batch shard in one CORE forward pass

    c.eval.chat_max_problems = -1           # chat_eval's problems per task (-1: all)

    # Post-training. Task data: "" = $NANOCHAT_TASK_DATA, else nanochat's datasets downloaded once;
    # "offline" = the subsets the package ships and the tasks it generates (no network).
    c.chat = ConfigDict()
    c.chat.data_dir = ""

    c.mid = ConfigDict()                    # midtraining: packed conversations, every token trained on
    c.mid.init_lr_frac = 1.0                # x the base learning rates; the schedule is base's
    c.mid.eval_every = 150                  # val bpb every this many steps, at step 0 and at the end
    c.mid.eval_tokens = 20 * 524288
    c.mid.max_examples = -1                 # one epoch of the mixture's first N conversations (-1: all)
    c.mid.checkpoint_every = 200            # (nanochat saves only the last step; ~809 steps on d20)

    c.sft = ConfigDict()                    # SFT: one conversation per row, assistant tokens only
    c.sft.init_lr_frac = 0.02               # then linear to 0 over one epoch
    c.sft.device_batch_size = 4             # conversations per device per micro-batch
    c.sft.examples_per_step = 32            # conversations per optimizer step
    c.sft.num_epochs = 1
    c.sft.max_examples = -1                 # train on the mixture's first N conversations (-1: all)
    c.sft.eval_every = 100                  # val loss every this many steps (and at 0 and the end) ...
    c.sft.eval_steps = 100                  # ... over this many micro-batches
    c.sft.mc_every = 200                    # MMLU and ARC-Easy accuracy every this many steps ...
    c.sft.mc_max_problems = 1024            # ... on at most this many problems each
    c.sft.checkpoint_every = 200            # (nanochat saves only the last step; ~701 steps on d20)

    c.rl = ConfigDict()                     # RL: REINFORCE with a per-question mean baseline
    c.rl.init_lr_frac = 0.05                # then linear to 0
    c.rl.examples_per_step = 16             # questions per optimizer step (over all processes)
    c.rl.num_samples = 16                   # sampled answers per question
    c.rl.device_batch_size = 8              # sequences per forward pass
    c.rl.max_new_tokens = 256
    c.rl.temperature = 1.0
    c.rl.top_k = 50
    c.rl.num_epochs = 1
    c.rl.max_examples = -1                  # train on the first N problems (-1: all)
    c.rl.eval_every = 60                    # pass@k on the test split every this many steps (and at the end) ...
    c.rl.eval_examples = 400                # ... on this many problems ...
    c.rl.eval_samples = 8                   # ... with this many samples each
    c.rl.save_every = 60

    c.mesh = ConfigDict()
    c.mesh.data = 1                         # pure data parallelism (params replicated)
    c.mesh.fsdp = -1                        # -1: every device not used by the other axes
    c.mesh.tensor = 1
    # logical axis -> mesh axes ("a,b" for several, "" for replicated). Parameters are laid out
    # FSDP-style: their model dim is split over `fsdp`; activations over the batch axes.
    c.mesh.rules = ConfigDict()
    c.mesh.rules.batch = "data,fsdp"
    c.mesh.rules.embed = "fsdp"
    c.mesh.rules.vocab = "tensor"
    c.mesh.rules.heads = "tensor"
    c.mesh.rules.mlp = "tensor"
    c.mesh.rules.act_embed = ""
    c.mesh.rules.act_seq = ""
    c.mesh.rules.act_heads = "tensor"
    c.mesh.rules.act_mlp = "tensor"
    return c
