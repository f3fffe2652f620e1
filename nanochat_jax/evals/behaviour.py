"""Behaviour figures: what a small chat model must show after post-training, whatever its scores.

On held-out prompts of each kind post-training taught (conversations, arithmetic word problems,
spelling), each prompt being its conversation up to the first assistant turn, the model replies
greedily with at most `max_new_tokens` new tokens (tool outputs included), many prompts decoding
together through `Engine.generate_many`, and we count:

- `ends_share`: replies that end with `<|assistant_end|>` within the budget (the model learned to
  stop), per kind and over all kinds;
- `calculator_share`: arithmetic replies that contain a `<|python_start|>` call (it learned to
  use the tool);
- `arithmetic_accuracy`, `spelling_accuracy`: replies the task's judge passes (the `####` answer,
  the exact spelling `word:w,o,r,d`).

SpellingBee is not among the kinds: its reference replies spell and count by hand before calling
the calculator, 160 to 190 tokens with the tiny config's tokenizer, so a perfect model would not
end within 128; chat_eval's SpellingBee row judges it with the full budget.

The engine also stops a reply on `<|bos|>`; such a reply has not ended, so each row keeps the
token it stopped on (`keep_stop`) to tell which. A prompt without room for the whole budget in the
model's context is left out of the shares and counted as `too_long`.
"""
import dataclasses
import time

from tqdm import tqdm

from nanochat_jax.conversation import render_for_completion
from nanochat_jax.engine import MAX_ROWS
from nanochat_jax.tasks import ArithmeticWordProblems, SimpleSpelling

ARITHMETIC, SPELLING = "arithmetic", "spelling"
PROMPTS_PER_KIND = 256  # the size of the generated held-out tasks


def held_out_tasks(conversations, data_dir=None, size: int = PROMPTS_PER_KIND) -> dict:
    """The kinds of prompts the figures are taken on: `conversations` (held-out chat, e.g. SFT's
    validation set), then the test splits of the generated tasks (words from `data_dir`'s list)."""
    return {"conversation": conversations, ARITHMETIC: ArithmeticWordProblems(size, split="test"),
            SPELLING: SimpleSpelling(size, split="test", data_dir=data_dir)}


def first_turn_prompt(tokenizer, conversation: dict) -> list[int]:
    """The conversation up to its first assistant message, rendered for the model to write it."""
    messages = conversation["messages"]
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
    if first is None:
        raise ValueError("a held-out conversation needs an assistant message to replace; this one has none")
    return render_for_completion(tokenizer, {"messages": messages[:first + 1]})


@dataclasses.dataclass
class KindCounts:
    """What one kind's replies did. `passed` is None for a kind without a judge."""
    prompts: int = 0
    too_long: int = 0
    ended: int = 0
    calculator_calls: int = 0
    passed: int | None = None

    def figures(self) -> dict:
        def share(n):
            return n / self.prompts if self.prompts else None
        out = dataclasses.asdict(self)
        out.update(ends_share=share(self.ended), calculator_share=share(self.calculator_calls))
        if self.passed is None:
            del out["passed"]
        else:
            out["accuracy"] = share(self.passed)
        return out


def judged(task) -> bool:
    return getattr(task, "eval_type", None) == "generative"


def behaviour_figures(engine, tokenizer, tasks_by_kind: dict, max_problems: int | None,
                      max_new_tokens: int = 128, max_rows: int | None = None) -> dict:
    """The figures above over the first `max_problems` conversations of each kind (None: all).
    `max_rows` rows decode together (None: the engine's default)."""
    if max_new_tokens < 1 or (max_problems is not None and max_problems < 1):
        raise ValueError(f"max_new_tokens and max_problems must be >= 1, got {max_new_tokens}, {max_problems}")
    start, context = time.perf_counter(), engine.cfg.sequence_len
    end, python_start = tokenizer.encode_special("<|assistant_end|>"), tokenizer.encode_special("<|python_start|>")
    counts, work = {}, []  # work: (kind, conversation, prompt) of the prompts that fit
    for kind, task in tasks_by_kind.items():
        counts[kind] = KindCounts(passed=0 if judged(task) else None)
        for i in range(len(task) if max_problems is None else min(len(task), max_problems)):
            conversation = task[i]
            prompt = first_turn_prompt(tokenizer, conversation)
            if len(prompt) + max_new_tokens > context:
                counts[kind].too_long += 1
            else:
                work.append((kind, conversation, prompt))

    per_call = 4 * (max_rows or MAX_ROWS)
    with tqdm(total=len(work), desc="behaviour", unit="prompt") as progress:
        for first in range(0, len(work), per_call):
            chunk = work[first:first + per_call]
            results = engine.generate_many([prompt for _, _, prompt in chunk], max_tokens=max_new_tokens,
                                           temperature=0.0, top_k=None, max_rows=max_rows, keep_stop=True)
            for (kind, conversation, prompt), (rows, _) in zip(chunk, results):
                reply = rows[0][len(prompt):]
                stopped = bool(reply) and reply[-1] in engine.stop_tokens
                c = counts[kind]
                c.prompts += 1
                c.ended += stopped and reply[-1] == end
                reply = reply[:-1] if stopped else reply
                c.calculator_calls += python_start in reply
                if c.passed is not None:
                    c.passed += bool(tasks_by_kind[kind].evaluate(conversation, tokenizer.decode(reply)))
            ended = sum(c.ended for c in counts.values())
            progress.update(len(chunk))
            progress.set_postfix(ends=f"{ended / progress.n:.3f}")
    return summarise(counts, max_new_tokens, time.perf_counter() - start)


def summarise(counts: dict[str, KindCounts], max_new_tokens: int, seconds: float) -> dict:
    """The headline figures (None where their kind is absent or had no prompt) and each kind's."""
    kinds = {kind: c.figures() for kind, c in counts.items()}
    prompts, ended = sum(c.prompts for c in counts.values()), sum(c.ended for c in counts.values())
    return {"max_new_tokens": max_new_tokens, "prompts": prompts, "ended": ended,
            "ends_share": ended / prompts if prompts else None,
            "calculator_share": kinds.get(ARITHMETIC, {}).get("calculator_share"),
            "arithmetic_accuracy": kinds.get(ARITHMETIC, {}).get("accuracy"),
            "spelling_accuracy": kinds.get(SPELLING, {}).get("accuracy"),
            "kinds": kinds, "seconds": seconds}


def report_items(figures: dict) -> tuple[dict, str]:
    """The headline figures as report lines, and a markdown table of every kind."""
    budget = figures["max_new_tokens"]
    headline = {f"ends with <|assistant_end|> within {budget} tokens": figures["ends_share"],
                "arithmetic calls the calculator": figures["calculator_share"],
                "arithmetic accuracy": figures["arithmetic_accuracy"],
                "spelling accuracy": figures["spelling_accuracy"]}
    def cell(x):
        return "-" if x is None else f"{x:.4f}"
    rows = ["| kind | prompts | too long | ends | calculator | accuracy |", "|---|---|---|---|---|---|"]
    rows += [f"| {kind} | {k['prompts']} | {k['too_long']} | {cell(k['ends_share'])} | {cell(k['calculator_share'])} "
             f"| {cell(k.get('accuracy'))} |" for kind, k in figures["kinds"].items()]
    return headline, "\n".join(rows)
