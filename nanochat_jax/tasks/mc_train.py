"""Multiple choice training questions from OpenBookQA, CommonsenseQA and Social IQa, stored in
ARC's format and rendered as ARC's: with ARC train, the offline stand-in for MMLU's
`auxiliary_train` (whose ARC and OpenBookQA parts they are; its RACE and MCTest parts are not
available offline). No download: without a local folder (data_dir or `$NANOCHAT_TASK_DATA`) the
package's own subset is read.
"""
from nanochat_jax.tasks import sources
from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.base import MultipleChoice, check_choice

SOURCES = ("openbookqa", "csqa", "socialiqa")


class MultipleChoiceTrain(ARC):
    """One source's training questions; ARC's `get_example` renders them (same row format)."""

    def __init__(self, source: str, data_dir=None, **kwargs):
        MultipleChoice.__init__(self, **kwargs)  # not ARC's: that one opens an ARC file
        check_choice("multiple choice training source", source, SOURCES)
        self.source = source
        folder = sources.local_dir(data_dir) or sources.OFFLINE_DIR
        path = sources.local_file(folder, f"mc_train/{source}_train.jsonl")
        self.rows = sources.Rows([row for _, row in sources.read_jsonl(path)])
