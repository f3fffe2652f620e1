"""SmolTalk (Hugging Face's smol-smoltalk): general chat conversations for small models, some with
a system message; 460K train and 24K test. Training data with no right answer to judge."""
from nanochat_jax.tasks import sources
from nanochat_jax.tasks.base import Task, check_choice

REPO = "HuggingFaceTB/smol-smoltalk"
FILES = {"train": [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)],
         "test": ["data/test-00000-of-00001.parquet"]}


class SmolTalk(Task):
    """Locally, `smoltalk/<split>.jsonl` with one `{"messages": [...]}` a line."""

    def __init__(self, split: str, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        check_choice("SmolTalk split", split, tuple(FILES))
        self.rows = sources.load_rows(data_dir, local=f"smoltalk/{split}.jsonl",
                                      remote=[sources.hf_url(REPO, f) for f in FILES[split]],
                                      columns=["messages"])

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return {"messages": self.rows[index]["messages"]}
