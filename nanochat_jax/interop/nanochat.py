"""nanochat's files in and out: `model_<step>.pt` + `meta_<step>.json` + `tokenizer/tokenizer.pkl`.

Import turns a nanochat checkpoint (the seed architecture) into a checkpoint of this project,
`checkpoints/<stage>/<tag>/`, with nanochat's tokenizer saved beside it, so every launcher that
loads a stage finds model and tokenizer together. No optimizer state is imported: fine-tuning
starts a fresh optimizer from the weights. Export writes a nanochat base directory that
nanochat's own scripts load. Files are read with restricted unpicklers (`torch_files`), never
`torch.load`/`pickle.load`, and a checkpoint with keys or config fields this model lacks (value
embeddings, smear, sliding windows of later nanochat) is refused, never half-loaded.
"""
import json
import pickle
import re
from pathlib import Path

import jax
import numpy as np
import tiktoken

from configs.base import base_config
from nanochat_jax import model as model_lib
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, tokenizer_hash
from nanochat_jax.interop.torch_files import BadCheckpointFile, read_pt, restricted_loads, write_pt
from nanochat_jax.tokenizer_tiktoken import TiktokenTokenizer

# nanochat's directory per stage, under its base dir
STAGE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
              "rl": "chatrl_checkpoints"}
MODEL_CONFIG_KEYS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"}
LAYER_WEIGHTS = (("attn", "c_q"), ("attn", "c_k"), ("attn", "c_v"), ("attn", "c_proj"), ("mlp", "c_fc"),
                 ("mlp", "c_proj"))
# the seed model's fixed constants: a model of ours with others cannot be written for nanochat
SEED_CONSTANTS = {"rope_base": 10000.0, "softcap": 15.0}


class IncompatibleCheckpoint(ValueError):
    """A checkpoint this project's model cannot represent exactly."""


def weight_names(n_layer: int) -> list[tuple[str, tuple]]:
    """nanochat's state-dict keys, each with its path in our parameter tree. All but the embedding
    are Linear weights: (out, in) in PyTorch, (in, out) kernels here."""
    names = [("transformer.wte.weight", ("wte",))]
    for i in range(n_layer):
        names += [(f"transformer.h.{i}.{part}.{name}.weight", ("blocks", i, part, name, "kernel"))
                  for part, name in LAYER_WEIGHTS]
    return names + [("lm_head.weight", ("lm_head", "kernel"))]


def _is_kernel(path: tuple) -> bool:
    return path[-1] == "kernel"


def params_from_state_dict(state: dict, n_layer: int) -> dict:
    """Our fp32 parameter tree from a nanochat state dict (numpy arrays, any float dtype)."""
    params = {}
    for key, path in weight_names(n_layer):
        array = np.asarray(state[key], np.float32)
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = array.T if _is_kernel(path) else array
    return params


def state_dict_from_params(params, n_layer: int) -> dict:
    """nanochat's state dict (fp32 numpy, PyTorch layout) from our parameter tree."""
    state = {}
    for key, path in weight_names(n_layer):
        array = np.asarray(jax.device_get(_at(params, path)), np.float32)
        state[key] = np.ascontiguousarray(array.T if _is_kernel(path) else array)
    return state


def _at(tree, path):
    for part in path:
        tree = tree[part]
    return tree


# ---- reading nanochat's files --------------------------------------------------------------------

class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state, runs nothing."""

    def __setstate__(self, state):
        self.state = state


def read_tokenizer_pickle(path) -> tiktoken.Encoding:
    """nanochat's `tokenizer.pkl` (a pickled tiktoken Encoding) through a restricted unpickler."""
    path = Path(path)
    obj = restricted_loads(path.read_bytes(), {("tiktoken.core", "Encoding"): _EncodingState})
    state = getattr(obj, "state", None)
    ok = (isinstance(state, dict) and isinstance(state.get("name"), str) and isinstance(state.get("pat_str"), str)
          and isinstance(state.get("mergeable_ranks"), dict) and isinstance(state.get("special_tokens"), dict)
          and all(isinstance(k, bytes) and type(v) is int for k, v in state["mergeable_ranks"].items())
          and all(isinstance(k, str) and type(v) is int for k, v in state["special_tokens"].items()))
    if not ok:
        raise BadCheckpointFile(f"{path} is not a pickled tiktoken Encoding with explicit ranks and special tokens")
    return tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"], mergeable_ranks=state["mergeable_ranks"],
                             special_tokens=state["special_tokens"])


def find_checkpoint(source, stage: str, step: int | None = None) -> tuple[Path, int, Path]:
    """(checkpoint dir, step, tokenizer dir) for a nanochat base dir or checkpoint dir.

    In a base dir the stage's largest model (`d<depth>`) is taken, as nanochat does; the step is the
    latest unless given; the tokenizer is `<base dir>/tokenizer`."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"no nanochat directory at {source}")
    if any(source.glob("model_*.pt")):
        ckpt, base = source, source.parent.parent
    else:
        root = source / STAGE_DIRS[stage]
        tags = [p for p in root.glob("*") if p.is_dir() and any(p.glob("model_*.pt"))] if root.is_dir() else []
        if not tags:
            raise FileNotFoundError(f"no nanochat {stage} checkpoint in {root} (expected <tag>/model_<step>.pt)")
        depth = lambda p: int(m.group(1)) if (m := re.fullmatch(r"d(\d+)", p.name)) else -1
        ckpt, base = max(tags, key=lambda p: (depth(p), p.stat().st_mtime)), source
    steps = sorted(int(m.group(1)) for p in ckpt.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", p.name)))
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no step {step} in {ckpt}; steps there: {steps}")
    return ckpt, step, base / "tokenizer"


def read_checkpoint(ckpt: Path, step: int) -> tuple[dict, dict]:
    """(model_config, state dict) of one nanochat step, checked to be the seed architecture."""
    meta_path = ckpt / f"meta_{step:06d}.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no {meta_path.name} beside model_{step:06d}.pt in {ckpt}")
    model_config = json.loads(meta_path.read_text()).get("model_config", {})
    unknown = sorted(set(model_config) - MODEL_CONFIG_KEYS)
    missing = sorted(MODEL_CONFIG_KEYS - set(model_config))
    if unknown or missing:
        raise IncompatibleCheckpoint(f"{meta_path}: model_config fields " + (f"not known to this model: {unknown}"
                                     if unknown else f"missing: {missing}") + "; only the seed architecture imports")
    state = read_pt(ckpt / f"model_{step:06d}.pt")
    if not isinstance(state, dict):
        raise BadCheckpointFile(f"model_{step:06d}.pt does not hold a state dict")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile's wrapper
    expected = dict(weight_names(model_config["n_layer"]))
    unknown, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unknown:
        raise IncompatibleCheckpoint(f"model_{step:06d}.pt has weights this model does not know: {unknown[:12]}"
                                     f"{' ...' if len(unknown) > 12 else ''} (a later nanochat architecture?); "
                                     f"refusing to load it partly")
    if missing:
        raise IncompatibleCheckpoint(f"model_{step:06d}.pt lacks weights: {missing[:12]}")
    return model_config, state


def config_for(model_config: dict, tag: str):
    """This project's run config for a nanochat model (the d<depth> recipe with its shapes)."""
    cfg = base_config(model_config["n_layer"])
    cfg.name = tag
    cfg.model.dim = model_config["n_embd"]
    cfg.model.n_head = model_config["n_head"]
    cfg.model.n_kv_head = model_config["n_kv_head"]
    cfg.model.head_dim = model_config["n_embd"] // model_config["n_head"]
    cfg.model.vocab_size = model_config["vocab_size"]
    cfg.model.sequence_len = model_config["sequence_len"]
    return cfg


def import_checkpoint(source, stage: str = "base", step: int | None = None, tag: str | None = None,
                      tokenizer_dir=None) -> dict:
    """Write nanochat's checkpoint as `checkpoints/<stage>/<tag>/` with its tokenizer; a summary."""
    ckpt, step, default_tok_dir = find_checkpoint(source, stage, step)
    tag = tag or ckpt.name
    out = checkpoint_dir(stage, tag)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already holds a checkpoint; pick another --tag or remove it")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else default_tok_dir
    if not (tok_dir / "tokenizer.pkl").exists():
        raise FileNotFoundError(f"no nanochat tokenizer at {tok_dir / 'tokenizer.pkl'}; the model needs the "
                                f"tokenizer it was trained with (pass --tokenizer DIR)")
    model_config, state = read_checkpoint(ckpt, step)
    tokenizer = TiktokenTokenizer(read_tokenizer_pickle(tok_dir / "tokenizer.pkl"))
    if tokenizer.vocab_size != model_config["vocab_size"]:
        raise IncompatibleCheckpoint(f"the tokenizer in {tok_dir} has {tokenizer.vocab_size:,} tokens, the model "
                                     f"{model_config['vocab_size']:,}")
    cfg = config_for(model_config, tag)
    model_cfg = model_lib.GPTConfig.from_config(cfg.model)
    params = params_from_state_dict(state, model_config["n_layer"])
    _, shapes, _ = model_lib.abstract_model(model_cfg)
    bad = [key for key, path in weight_names(cfg.model.depth) if _at(params, path).shape != _at(shapes, path).shape]
    if bad:
        raise IncompatibleCheckpoint(f"weights whose shapes do not match the model config: {bad[:6]}")
    meta = {"imported_from": str(ckpt / f"model_{step:06d}.pt"), "tokenizer": "tiktoken"}
    with Checkpointer(out, keep=None, every=None) as checkpointer:
        checkpointer.save(step, params, None, {}, cfg, meta, force=True, tokenizer_hash=tokenizer_hash(tokenizer))
        checkpointer.wait()
    tokenizer.save(out / "tokenizer")
    result = {"directory": str(out), "step": step, "tag": tag, "stage": stage, "n_layer": model_config["n_layer"],
              "dim": model_config["n_embd"], "vocab_size": tokenizer.vocab_size}
    if (tok_dir / "token_bytes.pt").exists():  # nanochat's counts U+FFFD as 3 bytes for partial UTF-8 tokens
        theirs = np.asarray(read_pt(tok_dir / "token_bytes.pt"))
        result["token_bytes_differing"] = int(np.sum(theirs != tokenizer.token_bytes()))
    return result


# ---- writing nanochat's files ------------------------------------------------------------------

def check_exportable(model_cfg: model_lib.GPTConfig) -> None:
    """Refuse what nanochat's seed model cannot compute: it hard-codes rotary base and softcap."""
    for field, value in SEED_CONSTANTS.items():
        if getattr(model_cfg, field) != value:
            raise IncompatibleCheckpoint(f"nanochat's model has {field} {value}, this one {getattr(model_cfg, field)}")


def export_checkpoint(loaded, out, stage: str = "base") -> Path:
    """Write a loaded model (`loading.LoadedModel`) as a nanochat base directory under `out`:
    `<stage dir>/d<depth>/model_<step>.pt`, `meta_<step>.json`, and `tokenizer/` (tiktoken only)."""
    cfg = loaded.model_cfg
    check_exportable(cfg)
    if not isinstance(loaded.tokenizer, TiktokenTokenizer):
        raise IncompatibleCheckpoint("nanochat reads a tiktoken tokenizer; this model uses a SentencePiece one, "
                                     "which tiktoken cannot represent (export with --format=hf instead)")
    out = Path(out)
    ckpt = out / STAGE_DIRS[stage] / f"d{cfg.n_layer}"
    ckpt.mkdir(parents=True, exist_ok=True)
    write_pt(ckpt / f"model_{loaded.step:06d}.pt", state_dict_from_params(loaded.params, cfg.n_layer))
    model_config = {"sequence_len": cfg.sequence_len, "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer,
                    "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "n_embd": cfg.dim}
    meta = {"step": loaded.step, "val_bpb": None, "model_config": model_config, "user_config": {},
            "device_batch_size": loaded.config.train.device_batch_size, "max_seq_len": cfg.sequence_len}
    (ckpt / f"meta_{loaded.step:06d}.json").write_text(json.dumps(meta, indent=2))
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "tokenizer.pkl").write_bytes(pickle.dumps(loaded.tokenizer.encoding))
    write_pt(tok_dir / "token_bytes.pt", loaded.tokenizer.token_bytes())
    return ckpt
