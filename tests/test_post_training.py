"""Midtraining and SFT on a tiny model: what each step trains on, the SFT loss against NumPy, and
both launchers resuming exactly after kill -9 (from a base checkpoint, offline data)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import chat_sft, mid_train
from nanochat_jax import sharding
from nanochat_jax import model as model_lib
from nanochat_jax.config import config_from_args
from nanochat_jax.conversation import render_conversation
from nanochat_jax.data.chat import MidtrainLoader, SFTLoader
from nanochat_jax.data.shards import DEMO_DIR, iter_documents
from nanochat_jax.tasks.mixtures import mid_tasks, sft_tasks
from nanochat_jax.tokenizer import Tokenizer, split_for_training, train_tokenizer
from nanochat_jax.train import PlacedRows
from nanochat_jax.train import build_training

REPO = Path(__file__).resolve().parents[1]
SEQ = 64
OVERRIDES = ["--config=tiny", "--config.tokenizer.vocab_size=512", "--config.model.depth=2",
             f"--config.model.sequence_len={SEQ}", "--config.train.device_batch_size=4",
             "--config.train.total_batch_size=256", "--config.train.checkpoint_every=3",
             "--config.chat.data_dir=offline"]
MID = ["--config.mid.checkpoint_every=3", "--config.mid.eval_every=0", "--config.mid.eval_tokens=512", "--config.mid.max_examples=100"]
SFT = ["--config.sft.device_batch_size=2", "--config.sft.examples_per_step=4", "--config.sft.eval_every=0",
       "--config.sft.eval_steps=2", "--config.sft.mc_every=0", "--config.sft.mc_max_problems=4",
       "--config.sft.checkpoint_every=3", "--config.sft.max_examples=48"]


# ---- what a step trains on (in-process, one device) ---------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A 512-token tokenizer of the demo corpus, as tok_train would leave it."""
    directory = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    docs = list(iter_documents([DEMO_DIR / "shard_00000.parquet"]))[:300]
    train_tokenizer((p for d in docs for p in split_for_training(d)), 512).save(directory)
    return directory


def one_device_training(cfg, num_iterations=4):
    return build_training(cfg, mesh=sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]),
                          num_iterations=num_iterations)


def copy_of(tree):
    return jax.tree.map(jnp.copy, tree)


def test_midtraining_trains_on_every_token_of_bos_aligned_rows(tokenizer_dir):
    cfg, _ = config_from_args(OVERRIDES)
    tok = Tokenizer.load(tokenizer_dir)
    training = one_device_training(mid_train.mid_config(cfg))
    train_task, _ = mid_tasks(cfg)
    with MidtrainLoader(train_task, tok, SEQ, training.local_rows) as loader:
        inputs, targets = (np.asarray(x) for x in next(PlacedRows(training, loader)))
    assert inputs.shape == targets.shape == training.batch_shape
    assert (targets >= 0).all()  # no position masked out: user text, tool output and all
    assert (inputs[..., 0] == tok.bos_id).all()
    assert (inputs[..., 1:] == targets[..., :-1]).all()


def test_a_small_mixture_is_buffered_for_packing_at_most_once(tokenizer_dir):
    cfg, _ = config_from_args(OVERRIDES)
    task, _ = mid_tasks(cfg)
    task.stop = 30
    with MidtrainLoader(task, Tokenizer.load(tokenizer_dir), SEQ, rows=1) as loader:
        next(loader)
        assert loader.progress <= 1  # not 1000 buffered conversations, 33 passes over 30


def test_mixture_tokens_from_a_sample_estimate_the_exact_count(tokenizer_dir, monkeypatch):
    cfg, _ = config_from_args(OVERRIDES)
    tok = Tokenizer.load(tokenizer_dir)
    task, _ = mid_tasks(cfg)
    task.stop = 1500
    exact, how = mid_train.epoch_tokens(task, tok, SEQ + 1)
    assert how == "all 1,500 conversations"
    monkeypatch.setattr(mid_train, "EXACT_COUNT_LIMIT", 1000)
    monkeypatch.setattr(mid_train, "SAMPLE_SIZE", 300)
    estimate, how = mid_train.epoch_tokens(task, tok, SEQ + 1)
    assert "300 evenly spaced of 1,500" in how
    assert estimate == pytest.approx(exact, rel=0.05)


@pytest.fixture(scope="module")
def sft_step(tokenizer_dir):
    """(training, params, opt_state, conversations, tokenizer, placed step batch, pad id): a step of 4
    conversations in 2 micro-batches of 2 on one device, from the offline SFT mixture."""
    cfg, _ = config_from_args(OVERRIDES + SFT[:2])
    cfg = chat_sft.sft_config(cfg)
    tok = Tokenizer.load(tokenizer_dir)
    training = one_device_training(cfg)
    assert training.batch_shape[:2] == (2, 2)
    task, _ = sft_tasks(cfg)
    with SFTLoader(task, tok, SEQ, training.local_rows, bucket=16) as loader:
        batch = next(chat_sft.ConversationSteps(training, loader))
        pad_id = loader.pad_id
    params, opt_state = training.init(jax.random.key(0))
    return training, params, opt_state, [task[i] for i in range(4)], tok, batch, pad_id


def step_loss(training, params, opt_state, batch) -> float:
    _, _, metrics = training.step(copy_of(params), copy_of(opt_state), batch)  # the step donates its inputs
    return float(metrics["loss"])


def test_sft_step_loss_is_the_mean_cross_entropy_over_assistant_tokens(sft_step):
    """Each conversation alone, unpadded, through the model; NumPy float64 log-softmax over the
    positions whose next token the renderer marks as the assistant's."""
    training, params, opt_state, conversations, tok, batch, _ = sft_step
    nats = []
    for conversation in conversations:
        ids, mask = render_conversation(tok, conversation, max_tokens=SEQ + 1)
        ids, mask = np.asarray(ids), np.asarray(mask)
        logits = np.asarray(model_lib.forward(training.graphdef, params, jnp.asarray(ids[None, :-1])), np.float64)[0]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        supervised = np.flatnonzero(mask[1:])
        nats += list(-logp[supervised, ids[1:][supervised]])
    assert len(nats) > 10
    assert step_loss(training, params, opt_state, batch) == pytest.approx(np.mean(nats), rel=1e-5)


def test_padding_a_step_wider_leaves_its_loss_unchanged(sft_step):
    training, params, opt_state, _, _, (inputs, targets), pad_id = sft_step
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    extra = ((0, 0), (0, 0), (0, 24))
    wider = training.place_batch(np.pad(inputs, extra, constant_values=pad_id), np.pad(targets, extra, constant_values=-1))
    narrow = step_loss(training, params, opt_state, training.place_batch(inputs, targets))
    assert step_loss(training, params, opt_state, wider) == pytest.approx(narrow, rel=1e-6)


def test_midtraining_without_a_base_model_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no base checkpoint .* launch.base_train"):
        mid_train.main(OVERRIDES + MID)


# ---- the launchers, killed and resumed (subprocesses, one device) -------------------------------

def launch(base_dir, module, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user has
    env["NANOCHAT_BASE_DIR"] = str(base_dir)
    return subprocess.Popen([sys.executable, "-m", module, *OVERRIDES, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc) -> tuple[str, dict]:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out, json.loads(out.strip().splitlines()[-1])


def kill_after_first_checkpoint(proc, checkpoints: Path) -> None:
    """kill -9 at a step line once the first checkpoint is complete (saves are asynchronous)."""
    for line in proc.stdout:
        if line.startswith("step 000") and (checkpoints / "3").exists():
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def step_rows(base_dir, stage) -> dict[int, dict]:
    """metrics.jsonl by step; a step run twice (after a resume) keeps its last line."""
    lines = (base_dir / "checkpoints" / stage / "tiny" / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}


def raw_losses(base_dir, stage) -> dict[int, float]:
    return {step: row["raw_loss"] for step, row in step_rows(base_dir, stage).items()}


@pytest.fixture(scope="module")
def mid_runs(tokenizer_dir, tmp_path_factory):
    """Two base directories with the same tokenizer and 2-step base model; midtraining runs
    through in the first, and is killed and resumed in the second."""
    reference, resumed = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("resumed")
    shutil.copytree(tokenizer_dir, reference / "tokenizer")
    finish(launch(reference, "launch.base_train", "--config.train.num_iterations=2", "--config.train.eval_every=0",
                  "--config.train.eval_tokens=512", "--config.train.sample_every=0"))
    shutil.copytree(reference, resumed, dirs_exist_ok=True)
    _, expected = finish(launch(reference, "launch.mid_train", *MID))
    kill_after_first_checkpoint(launch(resumed, "launch.mid_train", *MID), resumed / "checkpoints" / "mid" / "tiny")
    out, got = finish(launch(resumed, "launch.mid_train", *MID))
    return reference, resumed, expected, got, out


@pytest.mark.slow
def test_midtraining_resumes_exactly_after_kill(mid_runs):
    reference, resumed, expected, got, out = mid_runs
    assert "resumed from step" in out and "(resuming)" in out
    assert expected["step"] == expected["num_iterations"] > 3
    assert raw_losses(resumed, "mid") == raw_losses(reference, "mid")
    assert sorted(raw_losses(reference, "mid")) == list(range(1, expected["step"] + 1))
    assert got["val_bpb"] == expected["val_bpb"] > 0
    every_token = 4 * SEQ  # 4 rows of 64 targets per step, none ignored
    assert {row["supervised_tokens"] for row in step_rows(reference, "mid").values()} == {every_token}
    assert json.loads((reference / "report" / "midtraining.json").read_text())["val_bpb"] == expected["val_bpb"]


@pytest.mark.slow
def test_sft_from_mid_resumes_exactly_after_kill(mid_runs):
    reference, resumed, _, _, _ = mid_runs
    _, expected = finish(launch(reference, "launch.chat_sft", *SFT))
    assert expected["step"] == expected["num_iterations"] == 48 // 4
    assert "checkpoints/mid/tiny" in expected["source"]
    kill_after_first_checkpoint(launch(resumed, "launch.chat_sft", *SFT), resumed / "checkpoints" / "sft" / "tiny")
    out, got = finish(launch(resumed, "launch.chat_sft", *SFT))
    assert "resumed from step" in out
    assert raw_losses(resumed, "sft") == raw_losses(reference, "sft")
    assert got["val_loss"] == expected["val_loss"] > 0
    assert got["mmlu_acc"] == expected["mmlu_acc"] and 0 <= got["arc_easy_acc"] <= 1
    supervised = [row["supervised_tokens"] for row in step_rows(reference, "sft").values()]
    assert 0 < min(supervised) and max(supervised) < 4 * SEQ  # user text and padding are never targets

    other_horizon = launch(resumed, "launch.chat_sft", *SFT[:-1], "--config.sft.max_examples=40")
    out = other_horizon.communicate(timeout=600)[0]
    assert other_horizon.returncode == 1 and "was started for 12 steps and this command asks for 10" in out
