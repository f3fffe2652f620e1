"""RL (nanochat_jax/rl.py, launch/chat_rl.py): rollouts with their stop token and tool outputs,
advantages, the training rows' masks, the loss through the real train step against a NumPy
transcription of nanochat's objective, no recompilation with new weights, and the launcher's
kill -9 and resume."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from configs.tiny import get_config
from nanochat_jax import model as model_lib
from nanochat_jax import rl
from nanochat_jax.checkpoint import Checkpointer, abstract_tree, checkpoint_dir, load_params, tokenizer_hash
from nanochat_jax.data.shards import DEMO_DIR, iter_documents
from nanochat_jax.model import softcap_logits
from nanochat_jax.sharding import make_mesh, put_global_batch
from nanochat_jax.tasks import ArithmeticRL, Task
from nanochat_jax.tokenizer import split_for_training, train_tokenizer
from nanochat_jax.train import build_training
from test_engine import bigram_engine, random_params, tokenizer  # noqa: F401 -- a fixture

REPO = Path(__file__).resolve().parents[1]


class LetterE(Task):
    """A task a random model earns rewards on: any question; 1.0 when the answer holds an "e"."""

    def __init__(self, split: str = "train"):
        super().__init__()
        self.split = split

    def num_examples(self) -> int:
        return 64

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"say something {index}"},
                             {"role": "assistant", "content": "e"}]}

    def reward(self, conversation, completion: str) -> float:
        return float("e" in completion)


def rl_settings(**overrides):
    cfg = get_config()
    for key, value in overrides.items():
        cfg.rl[key] = value
    return cfg.rl


# ---- advantages and rewards --------------------------------------------------------------------

def test_advantage_is_reward_minus_its_questions_mean_without_std():
    adv = rl.advantages([[1, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    np.testing.assert_allclose(adv, [[0.5, -0.5, -0.5, 0.5], [-0.25, -0.25, -0.25, 0.75], [0, 0, 0, 0]])


def test_arithmetic_reward_is_one_only_for_the_right_final_answer():
    task = ArithmeticRL(size=3, split="train")
    problem = task[0]
    answer = problem["answer"]
    assert task.reward(problem, f"some working\n#### {answer}") == 1.0
    assert task.reward(problem, f"some working\n#### {int(answer) + 1}") == 0.0
    assert task.reward(problem, answer) == 0.0  # no "#### ": no reward, as in nanochat


# ---- rollouts: stop tokens and tool outputs --------------------------------------------------

def test_rollouts_keep_the_sampled_stop_token_and_mark_tool_outputs(tokenizer):  # noqa: F811
    special = tokenizer.encode_special
    start, end, bos = special("<|assistant_start|>"), special("<|assistant_end|>"), tokenizer.bos_id
    py_start, py_end = special("<|python_start|>"), special("<|python_end|>")
    out_start, out_end = special("<|output_start|>"), special("<|output_end|>")
    one, plus, three = tokenizer.encode("1+3")
    a, b = tokenizer.encode("ab")
    script = {start: [py_start, a], py_start: [one], one: [plus], plus: [three], three: [py_end], out_end: [end],
              a: [bos], b: [b]}
    engine = bigram_engine(tokenizer, script)
    stops = engine.stop_tokens
    prompts = [[bos, *tokenizer.encode("what is 1+3?"), start], [bos, b]]
    groups, produced = rl.sample_rollouts(engine, prompts, 8, max_tokens=12, temperature=1.0, top_k=None, seed=3)
    assert engine.stop_tokens == stops
    four = tokenizer.encode("4")
    tool = [py_start, one, plus, three, py_end, out_start, *four, out_end]
    kinds = set()
    for r in groups[0]:
        assert r.prompt == prompts[0]
        if r.completion[:1] == [py_start]:  # a tool call, its output forced, then the sampled stop
            assert (r.completion, r.sampled, r.stop) == (tool, [1] * 5 + [0] * (len(four) + 2), end)
        else:  # `a`, then a sampled <|bos|>: the row ends there, on that token
            assert (r.completion, r.sampled, r.stop) == ([a], [1], bos)
        kinds.add(r.stop)
    assert kinds == {end, bos}  # both branches drawn among 8 samples
    assert all((r.completion, r.stop) == ([b] * 12, None) for r in groups[1])  # ran out: no stop token
    assert produced == sum(len(r.completion) + (r.stop is not None) for g in groups for r in g)


# ---- training rows -------------------------------------------------------------------------------

BOS, US, UE, AS, AE, PS, PE, OS, OE = range(1, 10)


def hand_made_groups():
    """Two questions x 4 answers of unequal lengths: a tool call with forced output, stops
    sampled or not (ran out), and a sampled <|bos|> stop."""
    p0, p1 = [BOS, US, 20, 21, UE, AS], [BOS, US, 22, UE, AS]
    R = rl.Rollout
    return [
        [R(p0, [30, PS, 31, PE, OS, 32, OE, 33], [1, 1, 1, 1, 0, 0, 0, 1], AE, reward=1.0),
         R(p0, [34], [1], AE, reward=0.0),
         R(p0, [35, 36, 37], [1, 1, 1], None, reward=0.0),
         R(p0, [38, 39], [1, 1], BOS, reward=1.0)],
        [R(p1, [40, 41, 42, 43, 44], [1] * 5, AE, reward=0.0),
         R(p1, [], [], AE, reward=0.0),
         R(p1, [45, 46], [1, 1], AE, reward=0.0),
         R(p1, [PS, 47, PE, OS, 48, OE], [1, 1, 1, 0, 0, 0], None, reward=1.0)],
    ]


def test_targets_skip_prompt_tool_output_and_padding_but_train_the_sampled_stop():
    groups = hand_made_groups()
    adv = rl.advantages([[r.reward for r in g] for g in groups])
    batch = rl.step_batch(groups, adv, device_batch_size=2, questions=2, micro=4, widths=(8, 16, 32), pad=AE)
    assert batch.inputs.shape == (2, 4, 16)  # 8 rows, 4 to a micro-batch; longest row 15 positions
    targets = batch.targets.reshape(8, 16)
    _ = -1
    assert targets[0].tolist() == [_, _, _, _, _, 30, PS, 31, PE, _, _, _, 33, AE, _, _]
    assert targets[1].tolist() == [_, _, _, _, _, 34, AE] + [_] * 9
    assert targets[2].tolist() == [_, _, _, _, _, 35, 36, 37] + [_] * 8  # ran out: no stop to train
    assert targets[3].tolist() == [_, _, _, _, _, 38, 39, BOS] + [_] * 8
    assert targets[5].tolist() == [_, _, _, _, AE] + [_] * 11  # an immediate stop is still trained
    assert targets[7].tolist() == [_, _, _, _, PS, 47, PE, _, _, _] + [_] * 6
    inputs = batch.inputs.reshape(8, 16)
    assert inputs[0, :14].tolist() == [BOS, US, 20, 21, UE, AS, 30, PS, 31, PE, OS, 32, OE, 33]
    weights = batch.weights.reshape(8, 16)
    assert np.all((weights != 0) <= (targets >= 0))
    # pass (rows 0, 1): 6 + 2 targets; 4 passes in the step; advantages +0.5 and -0.5
    np.testing.assert_allclose(weights[0][targets[0] >= 0], 0.5 / (8 * 4))
    np.testing.assert_allclose(weights[1][targets[1] >= 0], -0.5 / (8 * 4))


def test_a_step_takes_the_smallest_width_that_holds_it_and_whole_micro_batches():
    groups = [g[:2] for g in hand_made_groups()]
    groups[0][0] = rl.Rollout([BOS, AS], [30], [1], AE)
    groups[1][0] = rl.Rollout([BOS, AS], [], [], AE)
    groups[0][1] = groups[1][1] = rl.Rollout([BOS, AS], [31, 32], [1, 1], None)
    batch = rl.step_batch(groups, rl.advantages([[0, 1], [1, 0]]), device_batch_size=2, questions=2, micro=3,
                          widths=(4, 8), pad=AE)
    assert batch.inputs.shape == (2, 3, 4)  # 4 rows -> 2 micro-batches of 3, the last padded
    assert np.all(batch.targets[1, 1:] == -1) and np.all(batch.weights[1, 1:] == 0)


def test_questions_must_have_whole_passes():
    groups = [hand_made_groups()[0][:3]]
    with pytest.raises(ValueError, match="multiple of device_batch_size 2"):
        rl.step_batch(groups, rl.advantages([[0, 1, 0]]), device_batch_size=2, questions=1, micro=2,
                      widths=(32,), pad=AE)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="rl.num_samples 6 must be a multiple of rl.device_batch_size 4"):
        rl.check_settings(rl_settings(num_samples=6, device_batch_size=4))
    rl.check_settings(rl_settings(num_samples=8, device_batch_size=16))  # a pass: one question's 8 answers
    assert rl.pass_size(rl_settings(num_samples=8, device_batch_size=16)) == 8
    with pytest.raises(ValueError, match="rl.examples_per_step must be at least 1"):
        rl.check_settings(rl_settings(examples_per_step=0))
    with pytest.raises(ValueError, match="make no step"):
        rl.num_steps(rl_settings(examples_per_step=16), 10)
    with pytest.raises(ValueError, match="cannot load the RL task 'GSM8K'"):
        rl.load_task("GSM8K", "train")


def test_steps_walk_the_split_in_order_and_wrap():
    assert rl.question_indices(0, 3, 7) == [0, 1, 2]
    assert rl.question_indices(2, 3, 7) == [6, 0, 1]


# ---- the loss through the real train step --------------------------------------------------------

def small_training(vocab_size: int, devices: int, sequence_len: int = 32):
    cfg = rl.training_config(get_config())
    cfg.model.depth, cfg.model.vocab_size, cfg.model.sequence_len = 1, vocab_size, sequence_len
    cfg.mesh.data, cfg.mesh.fsdp = devices, 1
    cfg.train.device_batch_size, cfg.train.total_batch_size = 1, sequence_len * devices
    return cfg, build_training(cfg, mesh=make_mesh(cfg.mesh, jax.devices()[:devices]), num_iterations=10)


def nanochat_loss(graphdef, params, groups, device_batch_size: int, examples_per_rank: int) -> float:
    """nanochat's chat_rl objective, pass by pass (with the sampled stop token kept): per pass,
    logp = log-softmax at the targets (0 where ignored), obj += sum(logp * A) / (valid tokens in
    the pass * passes per example * examples per rank); loss = -obj. In float64 from the model's
    logits."""
    model = nnx.merge(graphdef, params)
    num_passes = len(groups[0]) // device_batch_size
    obj = 0.0
    for group in groups:
        rewards = np.array([r.reward for r in group])
        adv = rewards - rewards.mean()
        for p in range(num_passes):
            rows = group[p * device_batch_size:(p + 1) * device_batch_size]
            width = max(len(r.tokens) for r in rows)
            ids, mask = np.full((len(rows), width), AE), np.zeros((len(rows), width), int)
            for i, r in enumerate(rows):
                ids[i, :len(r.tokens)], mask[i, :len(r.tokens)] = r.tokens, r.trained
            inputs, targets = ids[:, :-1], ids[:, 1:].copy()
            targets[mask[:, 1:] == 0] = -1
            logits = np.asarray(softcap_logits(model.lm_head(model.hidden(inputs)), model.cfg.softcap), np.float64)
            logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            logp = np.where(targets >= 0, np.take_along_axis(logprobs, np.maximum(targets, 0)[..., None], -1)[..., 0], 0)
            valid = max(1, int((targets >= 0).sum()))
            obj += (logp * adv[p * device_batch_size:(p + 1) * device_batch_size, None]).sum() / (
                valid * num_passes * examples_per_rank)
    return -obj


def test_train_step_loss_equals_nanochat_objective():
    cfg, training = small_training(vocab_size=64, devices=2)
    params = jax.device_put(random_params(training.model_cfg), training.param_shardings)
    params, opt_state = training.start_from(params)
    groups = hand_made_groups()
    expected = nanochat_loss(training.graphdef, params, groups, device_batch_size=2, examples_per_rank=2)
    rollouts = rl.StepRollouts(groups, 0.0, 0, 1.0, 0)
    batch = rl.train_batch(rollouts, rl_settings(device_batch_size=2), micro=2 * 2, widths=rl.row_widths(32), pad=AE)
    placed = tuple(put_global_batch(x, training.batch_sharding) for x in batch.arrays)
    _, _, metrics = training.step(params, opt_state, placed)
    assert abs(expected) > 1e-3  # the hand-made advantages do move the loss
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)


# ---- new weights every step compile nothing ------------------------------------------------------

def test_a_second_step_with_new_params_compiles_nothing(tokenizer):  # noqa: F811
    cfg, training = small_training(vocab_size=tokenizer.vocab_size, devices=1)
    params, opt_state = training.start_from(random_params(training.model_cfg))
    settings = rl_settings(examples_per_step=2, num_samples=4, device_batch_size=2, max_new_tokens=6)
    batches = rl.RolloutBatches(training, tokenizer, LetterE(), settings, seed=0, log=lambda _: None)
    engine_steps = lambda e: (e.prefill, e._sample_step, e._sample_rows, e.insert_rows, e._take_rows)
    compiled = lambda: [f._cache_size() for f in (*engine_steps(batches.engine), training.step)]
    sizes = []
    for _ in range(3):
        batches.observe(params)
        params, opt_state, _ = training.step(params, opt_state, next(batches))
        sizes.append(compiled())
    assert sizes[1] == sizes[2] == sizes[0]
    assert batches.get_state() == {"step": 3}


# ---- the launcher ---------------------------------------------------------------------------------

OVERRIDES = ["--config=tiny", "--config.tokenizer.vocab_size=512", "--config.model.depth=2",
             "--config.model.sequence_len=64", "--config.train.device_batch_size=4",
             "--config.train.total_batch_size=256", "--config.rl.examples_per_step=2", "--config.rl.num_samples=4",
             "--config.rl.device_batch_size=2", "--config.rl.max_new_tokens=8", "--config.rl.eval_every=0",
             "--config.rl.eval_examples=2", "--config.rl.eval_samples=2", "--config.rl.save_every=2",
             "--task=test_rl:LetterE", "--config.rl.max_examples=16"]


@pytest.fixture
def sft_dir(tmp_path):
    """A base directory with a 512-token tokenizer and a random-weight sft checkpoint."""
    docs = list(iter_documents([DEMO_DIR / "shard_00000.parquet"]))[:300]
    tok = train_tokenizer((p for d in docs for p in split_for_training(d)), 512)
    tok.save(tmp_path / "tokenizer")
    cfg = get_config()
    cfg.model.vocab_size, cfg.model.depth, cfg.model.sequence_len = 512, 2, 64
    params = random_params(model_lib.GPTConfig.from_config(cfg.model))
    os.environ["NANOCHAT_BASE_DIR"] = str(tmp_path)
    try:
        with Checkpointer(checkpoint_dir("sft", "tiny"), every=None) as ckpt:
            ckpt.save(5, params, None, {}, cfg, {}, force=True, tokenizer_hash=tokenizer_hash(tok))
            ckpt.wait()
    finally:
        del os.environ["NANOCHAT_BASE_DIR"]
    return tmp_path


def launch(base_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user has
    env["NANOCHAT_BASE_DIR"] = str(base_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])  # for test_rl:LetterE
    return subprocess.Popen([sys.executable, "-m", "launch.chat_rl", *OVERRIDES], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc) -> tuple[str, dict]:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out, json.loads(out.strip().splitlines()[-1])


def final_params(base_dir):
    cfg = get_config()
    cfg.model.vocab_size, cfg.model.depth, cfg.model.sequence_len = 512, 2, 64
    _, shapes, _ = model_lib.abstract_model(model_lib.GPTConfig.from_config(cfg.model))
    target = abstract_tree(shapes, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return load_params(base_dir / "checkpoints" / "rl" / "tiny", params_target=target)[0]


@pytest.mark.slow
def test_launcher_resumes_after_kill_to_the_uninterrupted_params(sft_dir, tmp_path_factory):
    reference_dir = tmp_path_factory.mktemp("reference")
    for item in ("tokenizer", "checkpoints"):
        subprocess.run(["cp", "-r", str(sft_dir / item), str(reference_dir / item)], check=True)
    out, reference = finish(launch(reference_dir))
    assert reference["step"] == reference["num_steps"] == 8 and set(reference) >= {"pass@1", "pass@2"}
    assert reference["rollout_tokens_per_s"] > 0
    metrics = [json.loads(line) for line in (reference_dir / "checkpoints/rl/tiny/metrics.jsonl").read_text().splitlines()]
    assert any(0 < m["mean_reward"] < 1 for m in metrics)  # advantages were not all zero
    rewards = [m["mean_reward"] for m in metrics]
    assert reference["mean_reward_first_quarter"] == pytest.approx(sum(rewards[:2]) / 2)
    assert reference["mean_reward_last_quarter"] == pytest.approx(sum(rewards[-2:]) / 2)
    assert 0 <= reference["start_pass@1"] <= 1

    proc = launch(sft_dir)
    first_checkpoint = sft_dir / "checkpoints" / "rl" / "tiny" / "2"
    for line in proc.stdout:  # kill -9 mid-run, once a checkpoint is complete
        if line.startswith("step 0000") and first_checkpoint.exists():
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    out, resumed = finish(launch(sft_dir))
    assert "resumed from step" in out
    expected, got = final_params(reference_dir), final_params(sft_dir)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert resumed["pass@1"] == reference["pass@1"]
    start = load_params(sft_dir / "checkpoints" / "sft" / "tiny", params_target=jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), expected))[0]
    assert not np.array_equal(start["lm_head"]["kernel"], expected["lm_head"]["kernel"])  # it did train
