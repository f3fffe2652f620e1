"""Chat data for midtraining and SFT: rows and targets hand-written against nanochat's rules
(one id per character: c is ord(c) + 100, the nine specials are 1..9), every token accounted
for, padding that leaves each conversation's loss unchanged, and exact resume."""
import functools
import json
import random

import jax
import numpy as np
import pytest

from nanochat_jax import model as model_lib
from nanochat_jax.conversation import render_conversation
from nanochat_jax.data.chat import MidtrainLoader, SFTLoader, bucket_width
from nanochat_jax.tasks import Task
from test_conversation import AE, AS, BOS, OE, OS, PE, PS, TOK, UE, US  # one id per character

H, I, Y, O, TWO, PLUS, FOUR = 204, 205, 221, 211, 150, 143, 152  # h i y o 2 + 4


class Conversations(Task):
    def __init__(self, conversations):
        super().__init__()
        self.conversations = conversations

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


HI_YO = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
HI_YO_IDS = [BOS, US, H, I, UE, AS, Y, O, AE]
CALC = {"messages": [{"role": "user", "content": "2+2"},
                     {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                       {"type": "python_output", "text": "4"},
                                                       {"type": "text", "text": "4"}]}]}
CALC_IDS = [BOS, US, TWO, PLUS, TWO, UE, AS, PS, TWO, PLUS, TWO, PE, OS, FOUR, OE, FOUR, AE]


def random_task(n, seed=0, max_chars=60):
    """Conversations of varied length; the user text starts with the index, so the first tokens
    of a row piece name its conversation."""
    rng = random.Random(seed)
    letters = "abcdefghij"
    conversations = []
    for i in range(n):
        user = f"{i:03d}" + "".join(rng.choice(letters) for _ in range(rng.randrange(0, max_chars)))
        reply = "".join(rng.choice(letters) for _ in range(rng.randrange(1, max_chars)))
        conversations.append({"messages": [{"role": "user", "content": user},
                                           {"role": "assistant", "content": reply}]})
    return Conversations(conversations)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            np.testing.assert_array_equal(u, v)


# ---- midtraining ---------------------------------------------------------------------------

def test_midtraining_rows_are_whole_renderings_with_every_token_trained():
    """Tool outputs and user text stay in the rows (nanochat drops the mask for midtraining);
    CALC is longer than a row and cropped to it; HI_YO arrives first and fills a row exactly."""
    loader = MidtrainLoader(Conversations([HI_YO, CALC]), TOK, seq_len=8, rows=2, loop=False)
    np.testing.assert_array_equal(next(loader), [HI_YO_IDS, CALC_IDS[:9]])
    with pytest.raises(StopIteration):
        next(loader)
    assert loader.stats()["tokens_out"] == 18 and loader.stats()["tokens_cropped"] == 8


def test_midtraining_packs_best_fit():
    """Row of 12 from a buffer of (user 'o', assistant 'h': 7 tokens) then HI_YO (9): the largest
    that fits goes first, though it arrived second; nothing fits the 3 left, so the shortest is
    cropped to them."""
    short = {"messages": [{"role": "user", "content": "o"}, {"role": "assistant", "content": "h"}]}
    loader = MidtrainLoader(Conversations([short, HI_YO]), TOK, seq_len=11, rows=1, buffer_docs=2)
    np.testing.assert_array_equal(next(loader), [HI_YO_IDS + [BOS, US, O]])


def test_packing_accounts_for_every_token():
    task = random_task(80)
    loader = MidtrainLoader(task, TOK, seq_len=40, rows=3, buffer_docs=10)
    rows = np.concatenate(take(loader, 12))
    state = loader.get_state()
    entered = [i % len(task) for i in range(state["epoch"] * len(task) + state["position"])]
    placed = list(entered)
    for index in state["buffer"]:
        placed.remove(index)
    full = {i: render_conversation(TOK, task[i], max_tokens=10**6)[0] for i in set(entered)}
    pieces = [piece for row in rows for piece in np.split(row, np.flatnonzero(row == BOS)[1:])]
    assert len(pieces) == len(placed) and all(p[0] == BOS for p in pieces)
    unnamed = 0
    for piece in pieces:
        if len(piece) < 5:  # too short to name its conversation: a prefix of any of them
            unnamed += 1
            continue
        index = int("".join(chr(t - 100) for t in piece[2:5]))
        assert list(piece) == full[index][:len(piece)]
        placed.remove(index)
    assert len(placed) == unnamed
    stats = loader.stats()
    assert stats["tokens_out"] == rows.size
    buffered = sum(min(len(full[i]), 41) for i in state["buffer"])  # cropped to a row as they entered
    assert sum(len(full[i]) for i in entered) == stats["tokens_out"] + stats["tokens_cropped"] + buffered
    assert stats["tokens_cropped"] > 0


def test_midtraining_resume_is_exact_across_epochs():
    task = random_task(30)
    make = lambda: MidtrainLoader(task, TOK, seq_len=24, rows=2, buffer_docs=6)
    uninterrupted = make()
    expected = take(uninterrupted, 14)
    first = make()
    take(first, 5)
    resumed = make()
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    assert_same_batches(take(resumed, 9), expected[5:])
    assert resumed.progress > 1  # the resumed run crossed into the second pass
    assert resumed.stats() == uninterrupted.stats()


def test_midtraining_one_pass_stops_after_progress_one():
    task = random_task(25)
    loader = MidtrainLoader(task, TOK, seq_len=16, rows=2, loop=False)
    batches = list(loader)
    assert batches and loader.progress == 1.0
    assert all(b.shape == (2, 17) and (b[:, 0] == BOS).all() for b in batches)


# ---- SFT -----------------------------------------------------------------------------------

def test_sft_targets_are_nanochats():
    """targets = ids[1:], -1 where mask[1:] is 0 (user text, tool outputs); the tool call and
    <|assistant_end|> are trained. Padding: inputs <|assistant_end|>, targets -1, to bucket 16."""
    inputs, targets = next(SFTLoader(Conversations([HI_YO, CALC]), TOK, seq_len=20, rows=2, bucket=8))
    _ = -1
    np.testing.assert_array_equal(inputs, [
        [BOS, US, H, I, UE, AS, Y, O] + [AE] * 8,
        [BOS, US, TWO, PLUS, TWO, UE, AS, PS, TWO, PLUS, TWO, PE, OS, FOUR, OE, FOUR]])
    np.testing.assert_array_equal(targets, [
        [_, _, _, _, _, Y, O, AE] + [_] * 8,
        [_, _, _, _, _, _, PS, TWO, PLUS, TWO, PE, _, _, _, FOUR, AE]])


def test_sft_crops_to_the_context_and_buckets_by_the_longest_row():
    inputs, targets = next(SFTLoader(Conversations([CALC]), TOK, seq_len=10, rows=1, bucket=4))
    np.testing.assert_array_equal(inputs, [CALC_IDS[:10]])
    np.testing.assert_array_equal(targets, [[-1] * 6 + [PS, TWO, PLUS, TWO]])
    assert inputs.shape == (1, 10)  # 10 positions: the context, not the bucket multiple 12
    inputs, _ = next(SFTLoader(Conversations([HI_YO]), TOK, seq_len=20, rows=1, bucket=64))
    assert inputs.shape == (1, 20)


@pytest.mark.parametrize("longest, expected", [(1, 64), (64, 64), (65, 128), (200, 256), (257, 300), (300, 300)])
def test_bucket_width(longest, expected):
    assert bucket_width(longest, 300, 64) == expected


def test_sft_padding_leaves_every_conversations_loss_unchanged():
    """A tiny random model's loss of each conversation alone (its own length, targets by
    nanochat's rule written here) equals its loss as a padded row of a bucketed batch."""
    cfg = model_lib.GPTConfig(vocab_size=256, n_layer=1, dim=16, n_head=2, n_kv_head=1, sequence_len=128)
    graphdef, shapes, _ = model_lib.abstract_model(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape, np.float32), shapes)
    loss = functools.partial(jax.jit(model_lib.loss_fn, static_argnums=0), graphdef, params)
    task = random_task(3, seed=3, max_chars=50)
    inputs, targets = next(SFTLoader(task, TOK, seq_len=128, rows=3, bucket=32))
    assert inputs.shape[1] in (32, 64, 96, 128) and (targets < 0).any(axis=1).all()
    for row, conversation in enumerate(task):
        ids, mask = map(np.array, render_conversation(TOK, conversation))
        alone = np.where(mask[1:] == 1, ids[1:], -1)
        expected = loss(ids[None, :-1], alone[None])
        np.testing.assert_allclose(loss(inputs[row:row + 1], targets[row:row + 1]), expected, rtol=1e-5)


def test_sft_resume_is_exact_and_one_pass_keeps_every_conversation():
    task = random_task(23)
    make = lambda **kw: SFTLoader(task, TOK, seq_len=64, rows=4, **kw)
    uninterrupted = take(make(), 12)
    first = make()
    take(first, 7)
    resumed = make()
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    assert_same_batches(take(resumed, 5), uninterrupted[7:])
    one_pass = list(make(loop=False))
    assert len(one_pass) == 6 and one_pass[-1][0].shape[0] == 4
    assert (one_pass[-1][1][3:] == -1).all() and (one_pass[-1][1][:3] >= 0).any()  # 23 = 5 * 4 + 3
    assert_same_batches(one_pass[:5], uninterrupted[:5])


@pytest.mark.parametrize("loader", [SFTLoader, MidtrainLoader])
def test_processes_take_disjoint_strided_shares(loader):
    """Same arguments, same batches; process p of 3 renders conversations p, p+3, ..."""
    task = random_task(31)
    make = lambda p: loader(task, TOK, 32, 2, process_index=p, process_count=3, loop=False)
    assert_same_batches(list(make(1)), list(make(1)))
    seen = []
    for p in range(3):
        tokens = np.concatenate([np.ravel(b[0] if isinstance(b, tuple) else b) for b in make(p)])
        starts = np.flatnonzero(tokens == BOS)
        named = {int("".join(chr(t - 100) for t in tokens[s + 2:s + 5])) for s in starts if s + 5 <= len(tokens)}
        assert all(i % 3 == p for i in named)
        seen += named
    assert len(seen) == len(set(seen))
    with pytest.raises(ValueError, match="process 3 of 4 gets no conversations"):
        loader(random_task(3), TOK, 32, 2, process_index=3, process_count=4)
