"""MMLU: four-way multiple choice over 57 subjects; `auxiliary_train` is nanochat's ~100K
multiple choice training questions (from ARC, OBQA, RACE and MCTest)."""
from nanochat_jax.tasks import sources
from nanochat_jax.tasks.base import MultipleChoice, check_choice, multiple_choice

LETTERS = ("A", "B", "C", "D")
SPLITS = {"all": ("dev", "validation", "test"), "auxiliary_train": ("train",)}


class MMLU(MultipleChoice):

    def __init__(self, subset: str, split: str, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        check_choice("MMLU subset", subset, tuple(SPLITS))
        check_choice(f"MMLU {subset} split", split, SPLITS[subset])
        local = f"mmlu/{split}.jsonl" if subset == "all" else "mmlu/auxiliary_train.jsonl"
        self.rows = sources.load_rows(
            data_dir, local=local,
            remote=[sources.hf_url("cais/mmlu", f"{subset}/{split}-00000-of-00001.parquet")])

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        row = row.get("train", row)  # Hugging Face wraps each auxiliary_train record in a 'train' field
        if len(row["choices"]) != len(LETTERS):
            raise sources.TaskDataError(f"an MMLU question must have 4 choices, got {len(row['choices'])}: "
                                        f"{row['question'][:60]!r}")
        return multiple_choice(row["question"], LETTERS, row["choices"], LETTERS[row["answer"]],
                               subject=row["subject"])
