"""HumanEval: 164 Python functions to complete, judged by running their unit tests.

The prompt is the start of a program (imports, signature, docstring). The judged program is
nanochat's: the prompt's leading import lines (a completion that rewrites the whole function often
leaves them out), then the first fenced code block of the completion or, without one, the whole
completion, then the problem's `test` code and `check(<entry point>)`. It runs in
`nanochat_jax.execution`'s sandbox, imported only when a completion is judged.
"""
import re

from nanochat_jax.tasks import sources
from nanochat_jax.tasks.base import Task

CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def prompt_imports(prompt: str) -> str:
    """The import lines at the top of the prompt (comments and blank lines skipped), one a line."""
    imports = []
    for line in map(str.strip, prompt.split("\n")):
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)


def extract_code(completion: str) -> str:
    match = CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip()


def build_program(conversation: dict, completion: str) -> str:
    return (prompt_imports(conversation["messages"][0]["content"]) + "\n\n" + extract_code(completion)
            + "\n\n" + conversation["test"] + "\n" + f"check({conversation['entry_point']})")


class HumanEval(Task):

    eval_type = "generative"

    def __init__(self, data_dir=None, timeout_s: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout_s = timeout_s
        self.rows = sources.load_rows(
            data_dir, local="humaneval/HumanEval.jsonl.gz",
            remote=[sources.hf_url("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet")])

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}],
                "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        from nanochat_jax.execution import execute_code
        return bool(execute_code(build_program(conversation, completion), timeout_s=self.timeout_s).passed)
