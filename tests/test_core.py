"""CORE against a one-example-at-a-time transcription of nanochat's rules, on a hand-made bundle
with the three task types; batching, padding and the mesh leave every outcome unchanged; the
packaged subset is nanochat's crop of the shared bundle; the bundle download; the launchers."""
import io
import json
import random
import re
import signal
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from configs.base import base_config
from nanochat_jax import model as model_lib
from nanochat_jax import sharding
from nanochat_jax.data.download import DownloadError
from nanochat_jax.data.shards import DEMO_DIR, iter_documents
from nanochat_jax.evals import bundle as bundle_lib
from nanochat_jax.evals import core as core_lib
from nanochat_jax.evals.core import CoreEvaluator, CoreResult, TaskResult
from nanochat_jax.tokenizer import split_for_training, train_tokenizer
from test_model import ref_logits, to_f64  # the float64 NumPy GPT, sharing no code with the model

SHARED = Path(__file__).resolve().parents[2] / "shared"
CFG = model_lib.GPTConfig(vocab_size=512, n_layer=2, dim=32, n_head=4, n_kv_head=2, sequence_len=64)
RULES = sharding.parse_rules(base_config(4).mesh.rules)
WORDS = ("the a red blue green fox hen cat dog river stone light house ran sat over under quickly slowly "
         "because when old young king queen ship sea wind rain bread salt gold silver").split()
# label: (type, shots, delimiter, random baseline %); squad is listed but its file is left out
TASKS = {"arc_easy": ("multiple_choice", 2, "\nAnswer: ", 25.0), "copa": ("multiple_choice", 0, " ", 50.0),
         "winograd": ("schema", 1, " ", 50.0), "lambada_openai": ("language_modeling", 2, " ", 0.0),
         "squad": ("language_modeling", 3, " ", 0.0)}


def sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize()


def make_items(task_type, rng, n):
    items = []
    for _ in range(n):
        if task_type == "multiple_choice":
            firsts = rng.sample(WORDS, rng.randint(2, 4))  # distinct first words: no choice is another's prefix
            choices = [f"{w} {sentence(rng, 0, 5)}".strip() for w in firsts]
            items.append({"query": f"Question: {sentence(rng, 3, 12)}?", "choices": choices,
                          "gold": rng.randrange(len(choices))})
        elif task_type == "schema":
            stem = sentence(rng, 2, 20)
            items.append({"context_options": [f"{stem} {w}" for w in rng.sample(WORDS, 2)],
                          "continuation": sentence(rng, 1, 8).lower() + ".", "gold": rng.randrange(2)})
        else:  # some contexts end in whitespace, which nanochat strips
            items.append({"context": sentence(rng, 4, 14) + rng.choice(["", " ", "\n"]),
                          "continuation": sentence(rng, 1, 3).lower()})
    return items


@pytest.fixture(scope="module")
def hand_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    rng = random.Random(0)
    entries = []
    for label, (task_type, shots, delimiter, _) in TASKS.items():
        uri = f"made_up/{label}.jsonl"
        entry = {"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": task_type}
        if delimiter != " ":
            entry["continuation_delimiter"] = delimiter
        entries.append(entry)
        if label != "squad":
            (root / "eval_data" / "made_up").mkdir(parents=True, exist_ok=True)
            items = make_items(task_type, rng, {"copa": 5}.get(label, 7))
            (root / "eval_data" / uri).write_text("".join(json.dumps(item) + "\n" for item in items))
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    (root / "eval_meta_data.csv").write_text(
        "Eval Task,Random baseline\n" + "".join(f"{label},{t[3]}\n" for label, t in TASKS.items()))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    docs = list(iter_documents([DEMO_DIR / "shard_00000.parquet"]))[:300]
    return train_tokenizer((p for d in docs for p in split_for_training(d)), CFG.vocab_size)


@pytest.fixture(scope="module")
def model():
    """Every weight random (init_params zeroes lm_head and c_proj, which would hide the network)."""
    graphdef, shapes, logical = model_lib.abstract_model(CFG)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32), shapes)
    return graphdef, params, shapes, logical


# ---- the reference: nanochat's rules, one example at a time, each prompt in its own forward pass ----

def reference_prompts(task_type, item, delimiter, shots):
    fewshot = ""
    for shot in shots:
        if task_type == "multiple_choice":
            fewshot += shot["query"] + delimiter + shot["choices"][shot["gold"]] + "\n\n"
        elif task_type == "schema":
            fewshot += shot["context_options"][shot["gold"]] + delimiter + shot["continuation"] + "\n\n"
        else:
            fewshot += shot["context"].strip() + delimiter + shot["continuation"] + "\n\n"
    if task_type == "multiple_choice":
        return [fewshot + item["query"] + delimiter + choice for choice in item["choices"]]
    if task_type == "schema":
        return [fewshot + option + delimiter + item["continuation"] for option in item["context_options"]]
    without = (fewshot + item["context"].strip() + delimiter).strip()
    return [without, fewshot + item["context"].strip() + delimiter + item["continuation"]]


def reference_task(task_type, items, delimiter, num_shots, tok, params64):
    """(outcome per example, mean span loss per scored row, the scored rows, their spans) as nanochat's
    evaluate_example gets them, each prompt alone through the float64 NumPy model."""
    outcomes, row_losses, all_rows, all_spans = [], [], [], []
    for idx, item in enumerate(items):
        others = [i for i in range(len(items)) if i != idx]
        shots = [items[i] for i in random.Random(1234 + idx).sample(others, num_shots)] if num_shots else []
        rows = [tok.encode(p, prepend=tok.bos_id) for p in reference_prompts(task_type, item, delimiter, shots)]
        if task_type == "language_modeling":
            assert rows[1][:len(rows[0])] == rows[0]
            rows, spans = rows[1:], [(len(rows[0]), len(rows[1]))]
        else:
            n = 0  # tokens shared by every row, from the left (MC) or from the right (schema)
            ordered = rows if task_type == "multiple_choice" else [r[::-1] for r in rows]
            while all(len(r) > n for r in ordered) and len({r[n] for r in ordered}) == 1:
                n += 1
            spans = [(n, len(r)) if task_type == "multiple_choice" else (len(r) - n, len(r)) for r in rows]
        means, all_hit = [], []
        for row, (start, end) in zip(rows, spans):
            logits = ref_logits(params64, np.array([row]), CFG)[0]
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # softcapped: |logits| < 15
            targets = np.array(row[start:end])
            positions = np.arange(start - 1, end - 1)
            means.append(float(-logp[positions, targets].mean()))
            all_hit.append(bool((logits[positions].argmax(-1) == targets).all()))
        if task_type == "language_modeling":
            outcomes.append(all_hit[0])
        else:
            outcomes.append(means.index(min(means)) == item["gold"])
        row_losses += means
        all_rows += rows
        all_spans += spans
    return outcomes, np.array(row_losses), all_rows, all_spans


@pytest.fixture(scope="module")
def reference(hand_bundle, tokenizer, model):
    params64 = to_f64(model[1])
    bundle = bundle_lib.load_bundle(hand_bundle)
    results = {}
    for task in bundle.tasks:
        items = bundle.items(task)
        if items is not None:
            results[task.label] = reference_task(task.task_type, items, task.delimiter, task.num_fewshot,
                                                 tokenizer, params64)
    return results


def evaluate(hand_bundle, tokenizer, model, mesh, **kwargs):
    """(outcomes per task, mean span losses per MC/schema task) of one evaluator configuration."""
    graphdef, params, shapes, logical = model
    params = jax.device_put(params, sharding.named_shardings(logical, shapes, mesh, RULES))
    evaluator = CoreEvaluator(graphdef, tokenizer, mesh, RULES, bundle_lib.load_bundle(hand_bundle), **kwargs)
    outcomes, losses = {}, {}
    for prepared in evaluator.prepare()[0]:
        mean_loss, all_correct = evaluator.row_scores(params, prepared)
        outcomes[prepared.task.label] = core_lib.example_outcomes(prepared, mean_loss, all_correct)
        if prepared.task.task_type != "language_modeling":
            losses[prepared.task.label] = mean_loss
    return outcomes, losses


def one_device():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


@pytest.fixture(scope="module")
def batched(hand_bundle, tokenizer, model):
    """The CORE result of the default batching on one device."""
    graphdef, params, _, _ = model
    mesh = one_device()
    return CoreEvaluator(graphdef, tokenizer, mesh, RULES, bundle_lib.load_bundle(hand_bundle))(params)


def test_core_equals_nanochat_one_example_at_a_time(batched, reference):
    assert list(batched.tasks) == ["arc_easy", "copa", "winograd", "lambada_openai"]
    for label, (outcomes, *_) in reference.items():
        assert batched.tasks[label].outcomes == outcomes, label
        assert batched.tasks[label].accuracy == pytest.approx(np.mean(outcomes))
    assert 0 < sum(sum(r[0]) for r in reference.values()) < sum(len(r[0]) for r in reference.values())


def test_prompts_and_spans_equal_the_reference(hand_bundle, tokenizer, reference):
    bundle = bundle_lib.load_bundle(hand_bundle)
    for task in bundle.tasks:
        if task.label in reference:
            prepared = core_lib.prepare_task(task, bundle.items(task), tokenizer)
            _, _, rows, spans = reference[task.label]
            assert prepared.rows == rows and prepared.spans.tolist() == [list(s) for s in spans], task.label


@pytest.mark.parametrize("variant", ["one example per forward", "8 devices, small groups", "heavy padding"])
def test_batching_padding_and_the_mesh_leave_outcomes_unchanged(hand_bundle, tokenizer, model, reference,
                                                                 variant, monkeypatch):
    mesh, kwargs = one_device(), {}
    if variant == "one example per forward":  # nanochat's batching
        kwargs = {"one_example_per_forward": True}
    elif variant == "8 devices, small groups":  # rows split over data x fsdp, a few rows per pass
        mesh, kwargs = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}), {"tokens_per_device": 128}
    elif variant == "heavy padding":  # every row, shared prefix and suffix padded far past its end
        monkeypatch.setattr(core_lib, "bucket_length", lambda n: 700)
        monkeypatch.setattr(core_lib, "prefix_bucket_length", lambda n: 704)
        monkeypatch.setattr(core_lib, "suffix_bucket_length", lambda n: 300)
    outcomes, losses = evaluate(hand_bundle, tokenizer, model, mesh, **kwargs)
    for label, (expected, row_losses, *_) in reference.items():
        assert outcomes[label] == expected, label
        if label in losses:
            np.testing.assert_allclose(losses[label], row_losses, rtol=2e-5)


def test_shared_prefix_scoring_equals_full_row_scoring(hand_bundle, tokenizer, model):
    """Per example, the batched path (shared prefixes run once) gives the losses, LM hits and
    outcomes of whole rows each in their own pass (nanochat's batching), and it did share."""
    graphdef, params, _, _ = model
    evaluator = CoreEvaluator(graphdef, tokenizer, one_device(), RULES, bundle_lib.load_bundle(hand_bundle))
    whole = CoreEvaluator(graphdef, tokenizer, one_device(), RULES, bundle_lib.load_bundle(hand_bundle),
                          one_example_per_forward=True)
    for prepared in evaluator.prepare()[0]:
        shared_loss, shared_correct = evaluator.row_scores(params, prepared)
        whole_loss, whole_correct = whole.row_scores(params, prepared)
        np.testing.assert_allclose(shared_loss, whole_loss, rtol=1e-5, err_msg=prepared.task.label)
        assert shared_correct.tolist() == whole_correct.tolist(), prepared.task.label
        assert core_lib.example_outcomes(prepared, shared_loss, shared_correct) == \
            core_lib.example_outcomes(prepared, whole_loss, whole_correct)
        prefixes = core_lib.shared_prefix_lengths(prepared)
        if prepared.task.label == "arc_easy":  # two shots and the question: most of each row is shared
            assert min(prefixes) > 20


def test_shared_prefix_leaves_each_span_and_its_predecessor_to_the_suffix():
    task = bundle_lib.Task("t", "multiple_choice", "d", 0, " ")
    cases = [  # (rows of one example, their spans, tokens run once)
        ([[1, 5, 6, 7, 8], [1, 5, 6, 9]], [(3, 5), (3, 4)], 2),  # MC: 3 shared, token 2 predicts the span
        ([[1, 6, 7, 8, 9, 9], [1, 5, 8, 9, 9]], [(4, 6), (3, 5)], 1),  # schema: shared until the options differ
        ([[1, 5, 6, 7]], [(2, 4)], 1),  # LM: one row, the context less its last token
        ([[1, 5]], [(1, 2)], 0),  # a span right after <|bos|>: nothing shared
    ]
    for rows, spans, expected in cases:
        prepared = core_lib.PreparedTask(task, rows, np.array(spans), [0], [0])
        assert core_lib.shared_prefix_lengths(prepared) == [expected], rows


def test_suffix_regions_take_two_lengths_a_task():
    """Examples up to the 90th percentile pad their suffixes to its bucket, the longer ones to the
    longest's; a uniform task gets one length."""
    suffixes = [5] * 8 + [17, 300]
    assert core_lib.suffix_region_lengths(suffixes) == [32] * 9 + [512]
    assert core_lib.suffix_region_lengths([40] * 3) == [64] * 3
    assert [core_lib.prefix_bucket_length(n) for n in (0, 1, 64, 65, 512, 513, 640, 641, 1025, 3000)] == \
        [64, 64, 64, 128, 512, 640, 640, 768, 1280, 3072]


def test_row_scorer_span_rules(model):
    """On token rows built from the model's own greedy choices: a span of greedy tokens is all
    correct, one changed token makes it wrong, and the mean loss is over the span's targets only."""
    graphdef, params, _, _ = model
    params64 = to_f64(params)
    row = [1, 40, 41, 42]
    for _ in range(5):
        row.append(int(np.argmax(ref_logits(params64, np.array([row]), CFG)[0, -1])))
    wrong = row[:6] + [(row[6] + 1) % 512] + row[7:]
    logits = ref_logits(params64, np.array([wrong]), CFG)[0]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens = np.ones((3, 16), np.int32)
    tokens[0, :len(row)], tokens[1, :len(wrong)], tokens[2, :len(wrong)] = row, wrong, wrong
    scores = core_lib.score_rows(params, jnp.asarray(tokens), graphdef=graphdef, mesh=one_device(),
                                 rules=tuple(RULES.items()))
    dispatched = core_lib.Dispatched([0, 1, 2], [0, 1, 2], [3, 3, 5], [8, 8, 7], scores)  # spans [4, 9), [6, 8)
    mean_loss, all_correct = core_lib.read_scores([dispatched], 3)
    assert all_correct.tolist() == [True, False, False]
    expected = -np.mean([logp[5, wrong[6]], logp[6, wrong[7]]])  # span [6, 8): positions 5 and 6 predict it
    assert float(mean_loss[2]) == pytest.approx(expected, rel=1e-5)


def test_fewshot_draws_are_python_random_sample():
    for n, idx, k in [(2, 0, 1), (2, 1, 1), (5, 4, 3), (11, 0, 10), (11, 10, 10), (60, 7, 10), (1000, 999, 10),
                      (1000, 3, 3), (20321, 20000, 10), (40, 17, 39)]:
        expected = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
        assert core_lib.fewshot_indices(n, idx, k) == expected, (n, idx, k)
    assert core_lib.fewshot_indices(5, 2, 0) == []


def test_shuffle_and_crop_are_random_1337(hand_bundle):
    bundle = bundle_lib.load_bundle(hand_bundle)
    task = bundle.tasks[0]
    raw = [json.loads(line) for line in (hand_bundle / "eval_data" / task.dataset_uri).read_text().splitlines()]
    random.Random(1337).shuffle(raw)
    assert bundle.items(task) == raw and bundle.items(task, 4) == raw[:4]


def test_centering_and_partial_core(batched):
    assert core_lib.centered(0.75, 25.0) == pytest.approx(2 / 3)
    assert core_lib.centered(0.5, 50.0) == 0.0 and core_lib.centered(0.2, 0.0) == pytest.approx(0.2)
    result = batched
    baselines = {label: t[3] for label, t in TASKS.items()}
    for label, task in result.tasks.items():
        acc = sum(task.outcomes) / len(task.outcomes)
        assert task.centered == pytest.approx((acc - baselines[label] / 100) / (1 - baselines[label] / 100))
    assert result.core == pytest.approx(np.mean([t.centered for t in result.tasks.values()]))
    # squad is listed but has no file; the other 18 CORE tasks are not listed at all
    assert result.partial and "squad" in result.missing and len(result.missing) == 22 - 4
    summary = result.summary()
    assert summary["tasks_evaluated"] == 4 and summary["core"] == result.core and summary["partial"] is True
    assert summary["per_task"]["copa"]["examples"] == 5 and summary["examples"] == 7 + 5 + 7 + 7
    full = CoreResult({"a": TaskResult("a", 0.5, 0.2, 10, 1.0, []), "b": TaskResult("b", 0.5, 0.4, 10, 1.0, [])}, [], 2.0)
    assert full.core == pytest.approx(0.3) and not full.partial and full.summary()["examples_per_s"] == 10.0


def test_too_few_examples_for_the_shots_is_a_clear_error(hand_bundle, tokenizer, model):
    with pytest.raises(ValueError, match="arc_easy draws 2 few-shot examples"):
        evaluate(hand_bundle, tokenizer, model, one_device(), max_per_task=2)


def test_processes_evaluate_the_tasks_they_all_hold_alike(hand_bundle, tokenizer, monkeypatch):
    """agree_across_processes against a simulated second process, given what that process would send:
    a task it lacks is missing for both, the order is process 0's, and a task whose rows differ
    (fewer examples there) is an error."""
    bundle = bundle_lib.load_bundle(hand_bundle)
    tasks = {t.label: t for t in bundle.tasks}
    prepare = lambda label, n=-1: core_lib.prepare_task(tasks[label], bundle.items(tasks[label], n), tokenizer)
    mine = [prepare(label) for label in ("arc_easy", "copa", "winograd", "lambada_openai")]

    def sent(prepared, missing):
        """What a process holding `prepared` contributes to the gather."""
        views = []
        monkeypatch.setattr(core_lib, "gather_json", lambda view: views.append(view) or [view])
        core_lib.agree_across_processes(prepared, missing)
        return views[0]

    theirs = sent([mine[3], mine[2], mine[0]], ["squad", "copa"])
    monkeypatch.setattr(core_lib, "gather_json", lambda view: [theirs, view])
    agreed, missing = core_lib.agree_across_processes(mine, ["squad"])
    assert [p.task.label for p in agreed] == ["lambada_openai", "winograd", "arc_easy"]
    assert missing == ["squad", "copa"]

    theirs = sent([mine[0], prepare("copa", 4)], ["squad"])
    monkeypatch.setattr(core_lib, "gather_json", lambda view: [theirs, view])
    with pytest.raises(ValueError, match="CORE task copa differs between processes"):
        core_lib.agree_across_processes(mine, ["squad"])


@pytest.mark.skipif(not (SHARED / "eval_bundle" / "core.yaml").exists(), reason="shared eval bundle absent")
def test_packaged_subset_is_nanochat_s_crop_of_the_shared_bundle():
    packaged, shared = bundle_lib.load_bundle(bundle_lib.PACKAGED_DIR), SHARED / "eval_bundle"
    assert packaged.shuffled_crop == 500 and packaged.name == "packaged subset"
    shared_tasks = {t.label: t for t in bundle_lib.load_bundle(shared).tasks}
    assert [t.label for t in packaged.tasks] == list(shared_tasks)
    for task in packaged.tasks:
        source = shared_tasks[task.label]
        assert (task.task_type, task.num_fewshot, task.delimiter) == \
            (source.task_type, source.num_fewshot, source.delimiter)
        lines = (shared / "eval_data" / source.dataset_uri).read_text().splitlines()
        items = [json.loads(line) for line in lines]
        random.Random(1337).shuffle(items)
        assert packaged.items(task, 500) == items[:500], task.label
        assert packaged.items(task, 7) == items[:7]
    with pytest.raises(bundle_lib.BundleError, match="first 500"):
        packaged.items(packaged.tasks[0], 501)
    with pytest.raises(bundle_lib.BundleError, match="first 500"):
        packaged.items(packaged.tasks[0], -1)
    size = sum(p.stat().st_size for p in bundle_lib.PACKAGED_DIR.rglob("*") if p.is_file())
    assert size < 1_000_000


# ---- the bundle download ---------------------------------------------------------------------

class RangeHandler(BaseHTTPRequestHandler):
    """Serves `server.body` at any path, honouring `Range: bytes=N-`."""

    def do_GET(self):
        self.server.ranges.append(self.headers.get("Range"))
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(self.server.body) - 1}/{len(self.server.body)}")
        self.send_header("Content-Length", str(len(self.server.body) - start))
        self.end_headers()
        self.wfile.write(self.server.body[start:])

    def log_message(self, *args):
        pass


def test_bundle_download_resumes_unpacks_and_is_found(hand_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv(bundle_lib.BUNDLE_ENV, raising=False)
    assert bundle_lib.resolve_bundle().name == "packaged subset"  # nothing downloaded or given
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:  # laid out as nanochat's: everything under eval_bundle/
        for path in hand_bundle.rglob("*"):
            if path.is_file():
                zf.write(path, f"eval_bundle/{path.relative_to(hand_bundle)}")
    server = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.body, server.ranges = buffer.getvalue(), []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "eval_bundle.zip.tmp").write_bytes(server.body[:100])  # an interrupted earlier download
        url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
        dest = bundle_lib.download_bundle(url)
        assert server.ranges == ["bytes=100-"]
        assert dest == tmp_path / "eval_bundle" and not (tmp_path / "eval_bundle.zip").exists()
        assert (dest / "core.yaml").read_bytes() == (hand_bundle / "core.yaml").read_bytes()
        assert bundle_lib.resolve_bundle().root == dest
        assert bundle_lib.download_bundle(url) == dest and len(server.ranges) == 1  # kept, not fetched again
    finally:
        server.shutdown()
    monkeypatch.setenv(bundle_lib.BUNDLE_ENV, str(hand_bundle))
    assert bundle_lib.resolve_bundle().root == hand_bundle


def test_bundle_download_offline_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="offline"):
        bundle_lib.download_bundle(f"http://127.0.0.1:{port}/eval_bundle.zip", tmp_path / "eval_bundle",
                                   attempts=1, timeout=2.0)


# ---- the launchers on a tiny trained checkpoint -------------------------------------------------

TRAIN_ARGS = ["--config=tiny", "--config.tokenizer.vocab_size=512", "--config.model.depth=2",
              "--config.model.sequence_len=64", "--config.train.device_batch_size=4",
              "--config.train.total_batch_size=2048", "--config.train.num_iterations=4",
              "--config.train.eval_every=0", "--config.train.eval_tokens=2048", "--config.train.sample_every=0",
              "--config.train.checkpoint_every=2", "--config.eval.core_tokens_per_device=256"]


@pytest.mark.slow
def test_core_in_base_training_and_base_eval_launcher(hand_bundle, tokenizer, tmp_path, monkeypatch, capsys):
    from launch import base_eval, base_train
    tokenizer.save(tmp_path / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv(bundle_lib.BUNDLE_ENV, str(hand_bundle))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        trained = base_train.main(TRAIN_ARGS + ["--config.train.core_every=2", "--config.train.core_max_per_task=-1"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    metrics = [json.loads(line) for line in (tmp_path / "checkpoints/base/tiny/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "core" in m] == [2, 4]
    assert trained["core"] == metrics[-1]["core"]
    capsys.readouterr()

    result = base_eval.main(TRAIN_ARGS + ["--max-per-task=-1"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert result["core"] == pytest.approx(trained["core"], abs=1e-6)  # same weights, same bundle
    assert result["tasks_evaluated"] == 4 and result["partial"] and "squad" in result["missing"]
    assert set(result["per_task"]) == {"arc_easy", "copa", "winograd", "lambada_openai"}
    assert result["examples_per_s"] > 0 and result["wall_time_s"] > 0
    assert (tmp_path / "base_eval" / "base_tiny_000004.csv").read_text().splitlines()[-1].startswith("CORE,")
    section = (tmp_path / "report" / "base-model-evaluation.md").read_text()
    assert f"- core: {result['core']:.4f}" in section and "- core partial: True" in section

    monkeypatch.delenv(bundle_lib.BUNDLE_ENV)  # the packaged subset holds 500 per task, no more
    with pytest.raises(SystemExit, match="max_per_task must be 1..500"):
        base_eval.main(TRAIN_ARGS + ["--max-per-task=501"])
