"""GSM8K: grade-school math word problems, solved with calculator calls.

Reference solutions annotate each computation as `<<expr=result>>` and end with `#### <answer>`.
The assistant's reference becomes a list of parts: the text between annotations, and for each
annotation a `python` part (the expression, which the model learns to write) followed by a
`python_output` part (the result, which the calculator supplies at inference time).
"""
import re

from nanochat_jax.tasks import sources
from nanochat_jax.tasks.base import Task, check_choice

SPLITS = ("train", "test")
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")  # nanochat's, after OpenAI's grade-school-math
ANNOTATION_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text: str) -> str | None:
    """The number after the first `#### `, commas removed, as a string; None if there is none.
    Answers compare as strings, as in nanochat: `#### 18.0` is not `#### 18`."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def solution_parts(solution: str) -> list[dict]:
    """Split a solution on its `<<expr=result>>` annotations into text, python and python_output
    parts (the result is what follows the last `=`; an annotation without one has an empty result)."""
    parts = []
    for piece in ANNOTATION_RE.split(solution):
        if ANNOTATION_RE.fullmatch(piece):
            inner = piece[2:-2]
            expression, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts += [{"type": "python", "text": expression}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def final_answer_matches(conversation: dict, completion: str) -> bool:
    """Whether the completion's `####` answer equals the reference's (in its last text part)."""
    reference = conversation["messages"][-1]["content"]
    expected = extract_answer(reference[-1]["text"] if isinstance(reference, list) else reference)
    return expected is not None and extract_answer(completion) == expected


class GSM8K(Task):

    eval_type = "generative"

    def __init__(self, subset: str, split: str, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        check_choice("GSM8K subset", subset, ("main", "socratic"))
        check_choice("GSM8K split", split, SPLITS)
        local = f"gsm8k_{split}.jsonl" if subset == "main" else f"gsm8k_{subset}_{split}.jsonl"
        self.rows = sources.load_rows(
            data_dir, local=local,
            remote=[sources.hf_url("openai/gsm8k", f"{subset}/{split}-00000-of-00001.parquet")])

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if "question" in row:  # Hugging Face: the solution already ends with '#### <answer>'
            question, solution = row["question"], row["answer"]
        else:  # the DCLM packaging: context, chain_of_thought and the bare answer
            question, solution = row["context"], f"{row['chain_of_thought']}\n#### {row['answer']}"
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": solution_parts(solution)}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return final_answer_matches(conversation, completion)
