"""Load a trained model for inference: parameters only (never the optimizer state), placed on
the local devices, with the config and tokenizer it was trained with.

A checkpoint says which tokenizer it uses: one saved beside its steps (`<run>/tokenizer/`, as an
import from nanochat writes, with nanochat's tiktoken vocabulary) travels with it; without one,
the model was trained here with the run's tokenizer in `$NANOCHAT_BASE_DIR/tokenizer`. A
checkpoint that recorded its tokenizer's hash loads only with that tokenizer: one retrained since,
even of the same size, would turn the model's token ids into other text."""
import copy
import dataclasses
import shutil
from pathlib import Path

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from nanochat_jax import model as model_lib
from nanochat_jax import paths
from nanochat_jax.checkpoint import STAGES, abstract_tree, load_info, load_params, tokenizer_hash
from nanochat_jax.tokenizer import MODEL_FILE, Tokenizer, load_tokenizer
from nanochat_jax.tokenizer_tiktoken import ENCODING_FILE, TiktokenTokenizer


@dataclasses.dataclass
class LoadedModel:
    graphdef: object
    params: dict
    model_cfg: model_lib.GPTConfig
    config: ConfigDict
    tokenizer: Tokenizer  # or tokenizer_tiktoken.TiktokenTokenizer: the same interface
    step: int
    directory: Path


def run_tokenizer(cfg) -> Tokenizer:
    """The tokenizer of this run ($NANOCHAT_BASE_DIR/tokenizer), checked against the config's vocabulary."""
    tok = Tokenizer.load(paths.tokenizer_dir())
    if tok.vocab_size != cfg.model.vocab_size:
        raise SystemExit(f"the tokenizer in {paths.tokenizer_dir()} has {tok.vocab_size:,} tokens but the config's model "
                         f"expects {cfg.model.vocab_size:,}: retrain it with `python -m launch.tok_train "
                         f"--config={cfg.name}`")
    return tok


def find_checkpoint_dir(stage: str, tag: str | None = None) -> Path:
    """checkpoints/<stage>/<tag>; without a tag, the run of that stage saved most recently."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    root = paths.base_dir() / "checkpoints" / stage
    runs = [p for p in root.glob("*") if p.is_dir()] if root.is_dir() else []
    if tag is not None:
        runs = [p for p in runs if p.name == tag]
    if not runs:
        hint = "python -m launch.base_train" if stage == "base" else f"the {stage} stage"
        raise FileNotFoundError(f"no {stage} checkpoint{f' tagged {tag!r}' if tag else ''} in {root}; train one "
                                f"with {hint}")
    return max(runs, key=lambda p: p.stat().st_mtime)


def newest_stage() -> str:
    """rl, sft, mid or base: the furthest pipeline stage with a checkpoint on disk, which is what a
    user means when they name none."""
    for stage in reversed(STAGES):
        try:
            find_checkpoint_dir(stage)
            return stage
        except FileNotFoundError:
            continue
    raise FileNotFoundError("no checkpoint of any stage yet; train one with `python -m launch.speedrun --config=tiny` "
                            "or `python -m launch.base_train`")


def tokenizer_dir_of(directory: Path) -> Path:
    """The tokenizer a checkpoint directory uses: its own if it has one, else the run's."""
    own = Path(directory) / "tokenizer"
    return own if own.is_dir() else paths.tokenizer_dir()


def load_model(stage: str, step: int | None = None, *, tag: str | None = None) -> LoadedModel:
    """The model of a stage's checkpoint (latest step unless given), replicated on the local devices."""
    directory = find_checkpoint_dir(stage, tag)
    info = load_info(directory, step)
    config = ConfigDict(info["config"])
    model_cfg = model_lib.GPTConfig.from_config(config.model)
    tokenizer = checked_tokenizer(directory, info, model_cfg)
    graphdef, shapes, _ = model_lib.abstract_model(model_cfg)
    mesh = jax.sharding.Mesh(jax.local_devices()[:1], ("data",))
    params, _ = load_params(directory, info["step"], params_target=abstract_tree(shapes, NamedSharding(mesh, P())))
    return LoadedModel(graphdef, params, model_cfg, config, tokenizer, info["step"], directory)


def checked_tokenizer(directory: Path, info: dict, model_cfg: model_lib.GPTConfig):
    """The checkpoint's tokenizer, refused unless it is the one the model was trained with."""
    tok_dir = tokenizer_dir_of(directory)
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"the tokenizer in {tok_dir} has {tokenizer.vocab_size:,} tokens but the "
                         f"model in {directory} was trained with {model_cfg.vocab_size:,}")
    recorded, actual = info["meta"].get("tokenizer_sha256"), tokenizer_hash(tokenizer)
    if recorded is not None and recorded != actual:
        tok_file = tok_dir / (ENCODING_FILE if isinstance(tokenizer, TiktokenTokenizer) else MODEL_FILE)
        raise ValueError(f"{tok_file} (sha256 {actual[:16]}...) is not the tokenizer the checkpoint "
                         f"{directory / str(info['step'])} was trained with (sha256 {recorded[:16]}...): "
                         f"put that tokenizer back, or train the model again")
    return tokenizer


RUNTIME_MODEL_FIELDS = ("compute_dtype", "attention", "remat", "loss_chunk")  # how to run, not what was trained


@dataclasses.dataclass
class Source:
    """A checkpoint a stage continues from or scores, with the run config to use for it."""
    directory: Path
    step: int
    info: dict
    config: ConfigDict  # the launcher's config with the checkpoint's model architecture
    tokenizer: Tokenizer

    def load_params(self, params_target):
        """The checkpoint's parameters restored into `params_target`'s shapes and shardings (no optimizer)."""
        return load_params(self.directory, self.step, params_target=params_target)[0]

    def carry_tokenizer(self, run_directory) -> None:
        """Give a run trained from this checkpoint the same tokenizer: a model's own tokenizer (an
        imported nanochat model's tiktoken vocabulary) is copied beside the new run's checkpoints,
        as `load_model` looks for it there; a model using the run's tokenizer needs nothing."""
        own = Path(self.directory) / "tokenizer"
        if own.is_dir() and jax.process_index() == 0:
            shutil.copytree(own, Path(run_directory) / "tokenizer", dirs_exist_ok=True)


def open_stage_source(cfg: ConfigDict, stage: str, checkpointer, *, source: str, tag: str | None = None,
                      step: int | None = None) -> tuple[Source, bool]:
    """(the checkpoint a training stage continues from, whether it is resuming): its own latest
    checkpoint when `checkpointer` has one (the model and tokenizer as the run saved them, the
    source never read again), else the `source` stage's."""
    if checkpointer.latest_step() is not None:
        return open_source(cfg, stage, tag=checkpointer.directory.name), True
    return open_source(cfg, source, tag=tag, step=step), False


def open_source(cfg: ConfigDict, stage: str, *, tag: str | None = None, step: int | None = None) -> Source:
    """The checkpoint of `stage` (latest run and step unless given): `cfg` keeps its data,
    training and runtime settings, but the model is the one in the checkpoint (an imported
    nanochat d20 stays a d20 under `--config=tiny`), and the tokenizer is the checkpoint's own,
    checked against the hash it recorded."""
    directory = find_checkpoint_dir(stage, tag)
    info = load_info(directory, step)
    cfg = copy.deepcopy(cfg)
    for key, value in info["config"]["model"].items():
        if key not in RUNTIME_MODEL_FIELDS and key in cfg.model:
            cfg.model[key] = value
    tokenizer = checked_tokenizer(directory, info, model_lib.GPTConfig.from_config(cfg.model))
    return Source(directory, info["step"], info, cfg, tokenizer)
