"""ARC (AI2 Reasoning Challenge), Easy and Challenge: grade-school science multiple choice."""
from nanochat_jax.tasks import sources
from nanochat_jax.tasks.base import LETTERS, MultipleChoice, check_choice, multiple_choice

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(MultipleChoice):

    def __init__(self, subset: str, split: str, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        check_choice("ARC subset", subset, SUBSETS)
        check_choice("ARC split", split, SPLITS)
        self.rows = sources.load_rows(
            data_dir, local=f"arc/{subset}_{split}.jsonl",
            remote=[sources.hf_url("allenai/ai2_arc", f"{subset}/{split}-00000-of-00001.parquet")])

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        choices = row["choices"]
        if isinstance(choices, dict):  # Hugging Face: the texts and their labels
            texts, letters = choices["text"], choices["label"]
        else:  # the original jsonl: the texts, labelled A, B, C, ... in order
            texts, letters = choices, LETTERS[:len(choices)]
        if row["answerKey"] not in letters:
            raise sources.TaskDataError(f"ARC question {row.get('id')!r}: answer {row['answerKey']!r} "
                                        f"is not one of its labels {list(letters)}")
        return multiple_choice(row["question"], letters, texts, row["answerKey"])
