"""CORE (DCLM, arXiv 2406.11794) scored by nanochat's rules, many examples per forward pass.

Per task, the bundle gives nanochat's list (shuffled with Random(1337), cropped to max_per_task).
Example i draws num_fewshot others with Random(1234 + i), is rendered with nanochat's templates and
tokenized with <|bos|> first. Multiple choice: a prompt per choice, the answer span starts at the
choices' common token prefix. Schema: a prompt per context option, the span is their common token
suffix. Language modelling: the prompt with the continuation, the span starting where the
(stripped) prompt without it ends, which must be a token prefix of it. MC and schema pick the
option with the lowest mean token loss over its span; LM is correct when the argmax predicts every
span token. Accuracy is centred by the task's random baseline rb (%): (acc - rb/100) / (1 - rb/100),
and CORE is the mean of the centred scores over the tasks evaluated (partial if any is missing).

nanochat runs one example per forward pass, each row whole (kept here as `one_example_per_forward`,
the baseline). Here many examples share a pass, a row each: the rows of one example share their
common token prefix (the few-shot examples and the question), which runs once, followed by every
row's own suffix (from the token before its span on), as shared_prefix.py lays out and masks.
Prefixes are right-padded with <|bos|> to length buckets, an example's suffixes together to one
of two lengths per task, and each (prefix, suffix) bucket has a fixed example count, split over
the mesh's batch axes, so that it compiles once.
Padding is never attended to by a real token, and the mean losses and hits over spans are taken
on the host from per-token scores. Prompts are not cropped to the training context (rotary
tables come from positions).

Every forward pass is a collective over the mesh, and its shape and count come from a task's rows:
under several processes, each host's bundle and tokenizer must give the same rows, or one process
would enter passes that the others never do. Before any pass the processes therefore compare
their prepared tasks: a task some process lacks is missing for all (CORE is then partial, as when
a file is missing on one machine), and a task whose rows differ between processes is an error.
"""
import collections
import dataclasses
import functools
import hashlib
import random
import time
from collections.abc import Callable, Sequence

import numpy as np

from nanochat_jax import sharding
from nanochat_jax.evals.bundle import Bundle, Task, resolve_bundle
from nanochat_jax.evals.processes import gather_json
from nanochat_jax.evals.shared_prefix import BLOCK, score_rows, score_shared_rows

CORE_TASKS = (  # nanochat's 22, in its report's order
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
    "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
    "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
    "bigbench_repeat_copy_logic", "squad", "coqa", "boolq", "bigbench_language_identification",
)
FEWSHOT_SEED = 1234


# ---- nanochat's prompts, spans and few-shot draws ----------------------------------------------

def render_multiple_choice(item, delimiter: str, shots) -> list[str]:
    context = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
    return [f"{context}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item, delimiter: str, shots) -> list[str]:
    context = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
    return [f"{context}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_language_modeling(item, delimiter: str, shots) -> list[str]:
    """[prompt without the continuation, stripped; prompt with it]. Contexts are stripped too:
    some datasets end them with whitespace that would merge into the continuation's first token."""
    context = "".join(f"{str(s['context']).strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
    prompt = f"{context}{str(item['context']).strip()}{delimiter}"
    return [prompt.strip(), f"{prompt}{item['continuation']}"]


RENDER = {"multiple_choice": render_multiple_choice, "schema": render_schema,
          "language_modeling": render_language_modeling}


class _Others(Sequence):
    """range(n) without `skip`. random.sample reads a population only through len() and indexing,
    so it draws the same items from this as from nanochat's n-long list, which is never built."""

    def __init__(self, n: int, skip: int):
        self.n, self.skip = n, skip

    def __len__(self):
        return self.n - 1

    def __getitem__(self, i):
        if not 0 <= i < self.n - 1:
            raise IndexError(i)
        return i + (i >= self.skip)


def fewshot_indices(n: int, idx: int, k: int) -> list[int]:
    """nanochat's few-shot draw for example idx of n: Random(1234 + idx).sample(others, k)."""
    return random.Random(FEWSHOT_SEED + idx).sample(_Others(n, idx), k) if k else []


def common_prefix_length(rows) -> int:
    shortest = min(map(len, rows))
    for i in range(shortest):
        if any(row[i] != rows[0][i] for row in rows):
            return i
    return shortest


def answer_spans(task_type: str, rows: list[list[int]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """The rows to score and each one's answer span [start, end) of token positions."""
    if task_type == "multiple_choice":
        start = common_prefix_length(rows)
        return rows, [(start, len(row)) for row in rows]
    if task_type == "schema":
        suffix = common_prefix_length([row[::-1] for row in rows])
        return rows, [(len(row) - suffix, len(row)) for row in rows]
    without, full = rows
    if not (len(without) < len(full) and full[:len(without)] == without):
        raise ValueError("the prompt without its continuation does not tokenize as a prefix of the prompt with it")
    return [full], [(len(without), len(full))]


# ---- one task's rows ---------------------------------------------------------------------------

@dataclasses.dataclass
class PreparedTask:
    """A task's token rows (the options of each example, consecutively) and what scores them."""
    task: Task
    rows: list[list[int]]
    spans: np.ndarray     # (rows, 2) answer span [start, end)
    first_row: list[int]  # per example: its first row; its rows run to the next example's first
    golds: list[int | None]


def prepare_task(task: Task, items: list[dict], tokenizer) -> PreparedTask:
    if task.num_fewshot >= len(items):
        raise ValueError(f"task {task.label} draws {task.num_fewshot} few-shot examples from the others, so it "
                         f"needs at least {task.num_fewshot + 1} examples; got {len(items)} (raise max_per_task)")
    prompts, counts = [], []
    for idx, item in enumerate(items):
        shots = [items[i] for i in fewshot_indices(len(items), idx, task.num_fewshot)]
        example_prompts = RENDER[task.task_type](item, task.delimiter, shots)
        prompts += example_prompts
        counts.append(len(example_prompts))
    tokens = tokenizer.encode(prompts, prepend=tokenizer.bos_id)
    rows, spans, first_row, offset = [], [], [], 0
    for idx, count in enumerate(counts):
        try:
            example_rows, example_spans = answer_spans(task.task_type, tokens[offset:offset + count])
        except ValueError as err:
            raise ValueError(f"task {task.label}, example {idx}: {err}") from None
        first_row.append(len(rows))
        rows += example_rows
        spans += example_spans
        offset += count
    golds = [item.get("gold") for item in items]
    return PreparedTask(task, rows, np.array(spans, np.int32).reshape(-1, 2), first_row, golds)


def task_digest(prepared: PreparedTask) -> str:
    """A fingerprint of what a task scores: its settings, rows, spans and golds."""
    digest = hashlib.sha256(repr(prepared.task).encode())
    for part in ([len(row) for row in prepared.rows], [t for row in prepared.rows for t in row], prepared.spans,
                 prepared.first_row, [-1 if g is None else g for g in prepared.golds]):
        digest.update(np.asarray(part, np.int64).tobytes())
    return digest.hexdigest()


def agree_across_processes(prepared: list[PreparedTask], missing: list[str]) -> tuple[list[PreparedTask], list[str]]:
    """The tasks every process prepared, in process 0's order, and the tasks missing on any process
    (see the module docstring); the same on every process."""
    views = gather_json({"tasks": [[p.task.label, task_digest(p)] for p in prepared], "missing": missing})
    if len(views) == 1:
        return prepared, missing
    held = [dict(view["tasks"]) for view in views]
    for label in sorted(set.intersection(*(set(h) for h in held))):
        if len({h[label] for h in held}) > 1:
            raise ValueError(f"CORE task {label} differs between processes: every host needs the same eval "
                             "bundle and tokenizer")
    lacking = [label for h in held for label in h if any(label not in other for other in held)]
    missing = list(dict.fromkeys([label for view in views for label in view["missing"]] + lacking))
    by_label = {p.task.label: p for p in prepared}
    return [by_label[label] for label, _ in views[0]["tasks"] if label not in missing], missing


def example_outcomes(prepared: PreparedTask, mean_loss: np.ndarray, all_correct: np.ndarray) -> list[bool]:
    """Per example: is it right? LM: every span token predicted. MC/schema: the option with the
    lowest mean span loss is the gold one (ties and NaNs resolved like nanochat's list.index(min))."""
    ends = prepared.first_row[1:] + [len(prepared.rows)]
    outcomes = []
    for first, end, gold in zip(prepared.first_row, ends, prepared.golds):
        if prepared.task.task_type == "language_modeling":
            outcomes.append(bool(all_correct[first]))
        else:
            losses = mean_loss[first:end].tolist()
            outcomes.append(losses.index(min(losses)) == gold)
    return outcomes


# ---- batched scoring ---------------------------------------------------------------------------

def bucket_length(n: int) -> int:
    """The padded length of a row of n tokens: 64, 128, 192, 256, 384, 512, 768, ... (less than 1.5x
    n once n > 96), so that a whole task compiles a handful of shapes."""
    power = max(64, 1 << (n - 1).bit_length())
    return power * 3 // 4 if power >= 256 and n <= power * 3 // 4 else power


def prefix_bucket_length(n: int) -> int:
    """The padded length of a shared prefix of n tokens: a multiple of 64 up to 512, then four steps
    an octave (640, 768, 896, 1024, 1280, ...): at most 1.25x n, and a few shapes per task."""
    step = BLOCK if n <= 8 * BLOCK else 1 << ((n - 1).bit_length() - 3)
    return max(BLOCK, -(-n // step) * step)


def suffix_bucket_length(n: int) -> int:
    """The padded length of an example's suffixes together (n tokens): a power of two, at least 16."""
    return max(16, 1 << (n - 1).bit_length())


def shared_prefix_lengths(prepared: PreparedTask) -> list[int]:
    """Per example: how many leading tokens all its rows share and run once. The longest common
    token prefix, cut to end before every span's first token's predecessor, whose logit predicts
    that token: so every scored position lies in the suffix."""
    ends = prepared.first_row[1:] + [len(prepared.rows)]
    return [min(common_prefix_length(prepared.rows[f:e]), int(prepared.spans[f:e, 0].min()) - 1)
            for f, e in zip(prepared.first_row, ends)]


@dataclasses.dataclass(frozen=True)
class Forward:
    """One example per forward pass (nanochat's batching): whole rows, padded to `length`."""
    length: int
    num_rows: int         # fixed per task: real rows, then padding rows
    row_ids: list[int]


def plan_one_example_forwards(prepared: PreparedTask, shards: int) -> list[Forward]:
    lengths = [len(row) for row in prepared.rows]
    ends = prepared.first_row[1:] + [len(lengths)]
    width = max(e - f for f, e in zip(prepared.first_row, ends))
    num_rows = -(-width // shards) * shards
    return [Forward(bucket_length(max(lengths[f:e])), num_rows, list(range(f, e)))
            for f, e in zip(prepared.first_row, ends)]


@dataclasses.dataclass(frozen=True)
class SharedForward:
    """Many examples per pass, a row each: its shared prefix padded to prefix_length, then all its
    rows' suffixes, padded to suffix_length together (see shared_prefix.py)."""
    prefix_length: int
    suffix_length: int
    num_examples: int     # fixed per (prefix_length, suffix_length): real, then padding
    example_ids: list[int]


def suffix_region_lengths(suffixes: list[int]) -> list[int]:
    """Per example, the padded length of its suffixes together (`suffixes` tokens): the bucket of
    the task's 90th percentile, or of its longest for the examples above it. Two lengths a task:
    every distinct (prefix, suffix) shape costs a compilation (~2.5 s on 2 cores), and a few long
    option lists (piqa's) would otherwise pad every example's suffixes to theirs."""
    short = suffix_bucket_length(sorted(suffixes)[(len(suffixes) - 1) * 9 // 10])
    long = suffix_bucket_length(max(suffixes))
    return [short if n <= short else long for n in suffixes]


def plan_shared_forwards(prepared: PreparedTask, prefix_lengths: list[int], shards: int,
                         tokens_per_device: int) -> list[SharedForward]:
    """Examples grouped by (prefix bucket, suffix region length), `tokens_per_device` worth of rows
    per batch shard in each pass (at least one example)."""
    ends = prepared.first_row[1:] + [len(prepared.rows)]
    suffixes = [sum(len(row) - prefix for row in prepared.rows[first:end])
                for first, end, prefix in zip(prepared.first_row, ends, prefix_lengths)]
    groups = collections.defaultdict(list)
    for example, (prefix, suffix) in enumerate(zip(prefix_lengths, suffix_region_lengths(suffixes))):
        groups[prefix_bucket_length(prefix), suffix].append(example)
    forwards = []
    for (prefix, suffix), examples in sorted(groups.items()):
        num_examples = shards * max(1, tokens_per_device // (prefix + suffix))
        forwards += [SharedForward(prefix, suffix, num_examples, examples[i:i + num_examples])
                     for i in range(0, len(examples), num_examples)]
    return forwards


@dataclasses.dataclass
class Dispatched:
    """A pass in flight: where each of its rows' scored positions sit in the (rows, length) scores
    it returns (position p scores token p + 1)."""
    row_ids: list[int]
    slots: list[int]
    first: list[int]      # each row's first scored position; its last is end - 1
    end: list[int]
    scores: tuple         # (token losses, argmax hits), device arrays until read


def read_scores(dispatched: list[Dispatched], num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean loss over each row's span, whether every span token was predicted) from the passes'
    per-token scores; each pass ran on the device while the next one was built."""
    mean_loss = np.zeros(num_rows, np.float32)
    all_correct = np.zeros(num_rows, bool)
    for d in dispatched:
        losses, hits = (np.asarray(a) for a in d.scores)
        for row_id, slot, first, end in zip(d.row_ids, d.slots, d.first, d.end):
            mean_loss[row_id] = losses[slot, first:end].mean(dtype=np.float64)
            all_correct[row_id] = hits[slot, first:end].all()
    return mean_loss, all_correct


# ---- results -----------------------------------------------------------------------------------

def centered(accuracy: float, random_baseline_pct: float) -> float:
    return (accuracy - 0.01 * random_baseline_pct) / (1.0 - 0.01 * random_baseline_pct)


@dataclasses.dataclass
class TaskResult:
    label: str
    accuracy: float
    centered: float
    examples: int
    seconds: float
    outcomes: list[bool]


@dataclasses.dataclass
class CoreResult:
    tasks: dict[str, TaskResult]
    missing: list[str]  # CORE tasks not evaluated: absent from core.yaml, or their file is missing
    seconds: float

    @property
    def core(self) -> float | None:
        return float(np.mean([t.centered for t in self.tasks.values()])) if self.tasks else None

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    @property
    def examples(self) -> int:
        return sum(t.examples for t in self.tasks.values())

    def summary(self) -> dict:
        """The JSON figures: core, tasks_evaluated, per_task, partial, missing, examples_per_s, wall_time_s."""
        return {
            "core": self.core, "tasks_evaluated": len(self.tasks), "partial": self.partial, "missing": self.missing,
            "per_task": {label: {"accuracy": t.accuracy, "centered": t.centered, "examples": t.examples,
                                 "seconds": round(t.seconds, 3)} for label, t in self.tasks.items()},
            "examples": self.examples, "examples_per_s": self.examples / self.seconds if self.seconds else None,
            "wall_time_s": round(self.seconds, 3),
        }

    def table(self) -> str:
        """A markdown table: one row per task, then CORE."""
        lines = ["| task | accuracy | centered | examples | seconds |", "|---|---|---|---|---|"]
        lines += [f"| {t.label} | {t.accuracy:.4f} | {t.centered:.4f} | {t.examples} | {t.seconds:.1f} |"
                  for t in self.tasks.values()]
        core = "n/a" if self.core is None else f"{self.core:.4f}"
        lines.append(f"| CORE{' (partial: %d tasks)' % len(self.tasks) if self.partial else ''} |  | {core} "
                     f"| {self.examples} | {self.seconds:.1f} |")
        return "\n".join(lines)


# ---- the evaluator -----------------------------------------------------------------------------

class CoreEvaluator:
    """CORE of a model over a bundle. Prompts are rendered and tokenized once (on first use) and
    reused by every call, e.g. the periodic runs during training.

    tokens_per_device: the padded tokens of the example rows each batch shard holds per pass (bounds
    memory).
    one_example_per_forward: nanochat's batching (one example's options per forward), for comparison.
    """

    def __init__(self, graphdef, tokenizer, mesh, rules, bundle: Bundle, max_per_task: int = -1, *,
                 tokens_per_device: int = 8192, one_example_per_forward: bool = False):
        self.tokenizer, self.mesh, self.rules, self.bundle = tokenizer, mesh, rules, bundle
        self.max_per_task, self.tokens_per_device = max_per_task, tokens_per_device
        self.one_example = one_example_per_forward
        static = {"graphdef": graphdef, "mesh": mesh, "rules": tuple(sorted(rules.items()))}
        self.score = functools.partial(score_rows, **static)
        self.score_shared = functools.partial(score_shared_rows, **static)
        self.shards = sharding.batch_shards(mesh, rules)
        self._prepared = None

    def prepare(self) -> tuple[list[PreparedTask], list[str]]:
        """(the tasks present, prepared; the CORE tasks missing). Every process must call it at the
        same point: the processes agree here on the tasks to evaluate."""
        if self._prepared is None:
            prepared, missing = [], []
            for task in self.bundle.tasks:
                items = self.bundle.items(task, self.max_per_task)
                if items is None:
                    missing.append(task.label)
                else:
                    prepared.append(prepare_task(task, items, self.tokenizer))
            listed = {task.label for task in self.bundle.tasks}
            missing += [label for label in CORE_TASKS if label not in listed]
            self._prepared = agree_across_processes(prepared, missing)
        return self._prepared

    def row_scores(self, params, prepared: PreparedTask) -> tuple[np.ndarray, np.ndarray]:
        """(mean span loss, all span tokens predicted) of every row of a task."""
        if self.one_example:
            dispatched = [self.dispatch_rows(params, prepared, fwd)
                          for fwd in plan_one_example_forwards(prepared, self.shards)]
        else:
            prefix_lengths = shared_prefix_lengths(prepared)
            dispatched = [self.dispatch_shared(params, prepared, prefix_lengths, fwd)
                          for fwd in plan_shared_forwards(prepared, prefix_lengths, self.shards, self.tokens_per_device)]
        return read_scores(dispatched, len(prepared.rows))

    def dispatch_rows(self, params, prepared: PreparedTask, fwd: Forward) -> Dispatched:
        tokens = np.full((fwd.num_rows, fwd.length), self.tokenizer.bos_id, np.int32)
        for slot, row_id in enumerate(fwd.row_ids):
            tokens[slot, :len(prepared.rows[row_id])] = prepared.rows[row_id]
        starts, ends = prepared.spans[fwd.row_ids].T
        return Dispatched(fwd.row_ids, list(range(len(fwd.row_ids))), (starts - 1).tolist(), (ends - 1).tolist(),
                          self.score(params, *self.place(tokens)))

    def dispatch_shared(self, params, prepared: PreparedTask, prefix_lengths: list[int],
                        fwd: SharedForward) -> Dispatched:
        """Rows [prefix | suffixes] (see shared_prefix.py): each suffix continues its prefix's positions."""
        length, region = fwd.prefix_length + fwd.suffix_length, fwd.prefix_length
        tokens = np.full((fwd.num_examples, length), self.tokenizer.bos_id, np.int32)
        positions = np.zeros((fwd.num_examples, length), np.int32)
        positions[:, :region] = np.arange(region)
        prefixes = np.zeros(fwd.num_examples, np.int32)
        segments = np.full((fwd.num_examples, fwd.suffix_length), -1, np.int32)
        ends = prepared.first_row[1:] + [len(prepared.rows)]
        d = Dispatched([], [], [], [], ())
        for slot, example in enumerate(fwd.example_ids):
            first, end, prefix = prepared.first_row[example], ends[example], prefix_lengths[example]
            tokens[slot, :prefix] = prepared.rows[first][:prefix]
            prefixes[slot], offset = prefix, 0
            for segment, row_id in enumerate(range(first, end)):
                suffix = prepared.rows[row_id][prefix:]
                at = region + offset
                tokens[slot, at:at + len(suffix)] = suffix
                positions[slot, at:at + len(suffix)] = np.arange(prefix, prefix + len(suffix))
                segments[slot, offset:offset + len(suffix)] = segment
                span_start, span_end = prepared.spans[row_id] - prefix + offset
                d.row_ids.append(row_id)
                d.slots.append(slot)
                d.first.append(int(span_start) - 1)
                d.end.append(int(span_end) - 1)
                offset += len(suffix)
        d.scores = self.score_shared(params, *self.place(tokens, positions, prefixes, segments))
        return d

    def place(self, *arrays):
        """Each array's first dim split over the mesh's batch axes."""
        return tuple(sharding.put_global_batch(a, sharding.batch_sharding(self.mesh, self.rules, a.ndim, 0))
                     for a in arrays)

    def __call__(self, params, log: Callable[[str], None] | None = None) -> CoreResult:
        start = time.perf_counter()
        prepared_tasks, missing = self.prepare()
        results = {}
        for prepared in prepared_tasks:
            t0 = time.perf_counter()
            outcomes = example_outcomes(prepared, *self.row_scores(params, prepared))
            task = prepared.task
            accuracy = float(np.mean(outcomes))
            results[task.label] = TaskResult(task.label, accuracy, centered(accuracy, self.bundle.baselines[task.label]),
                                             len(outcomes), time.perf_counter() - t0, outcomes)
            if log is not None:
                r = results[task.label]
                log(f"{task.label:<34} {task.num_fewshot:>2}-shot {task.task_type:<17} accuracy {r.accuracy:.4f} | "
                    f"centered {r.centered:+.4f} | {r.examples} examples | {r.seconds:.1f}s")
        return CoreResult(results, missing, time.perf_counter() - start)


def training_evaluator(cfg, graphdef, tokenizer, mesh, rules) -> CoreEvaluator | None:
    """The CORE that base training runs every train.core_every steps and at the end, on
    train.core_max_per_task examples per task (None when that is 0). Prepared now, so that a bundle
    too small for the cap stops the run before training rather than at its first CORE."""
    if cfg.train.core_max_per_task == 0:
        return None
    evaluator = CoreEvaluator(graphdef, tokenizer, mesh, rules, resolve_bundle(), cfg.train.core_max_per_task,
                              tokens_per_device=cfg.eval.core_tokens_per_device)
    evaluator.prepare()
    return evaluator
