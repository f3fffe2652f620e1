"""ChitChat: open-domain small talk between people (chitchat-dataset), the offline stand-in for
SmolTalk's format (casual and informal, not SmolTalk's quality). Training data with no right
answer to judge.

`chitchat/conversations.jsonl` holds `{"id", "messages"}` a line. The split is decided by a
checksum of the id (one conversation in ten is val), so a conversation is in the same split in
the package's subset and in the full file. No download: without a local folder (data_dir or
`$NANOCHAT_TASK_DATA`) the package's own subset is read.
"""
import zlib

from nanochat_jax.conversation import ConversationError, check_conversation
from nanochat_jax.tasks import sources
from nanochat_jax.tasks.base import Task, check_choice

LOCAL = "chitchat/conversations.jsonl"
SPLITS = ("train", "val")
VAL_SHARE = 10  # one conversation in this many is val


def is_val(conversation_id: str) -> bool:
    return zlib.crc32(conversation_id.encode()) % VAL_SHARE == 0


class ChitChat(Task):

    def __init__(self, split: str = "train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        check_choice("ChitChat split", split, SPLITS)
        path = sources.local_file(sources.local_dir(data_dir) or sources.OFFLINE_DIR, LOCAL)
        rows = []
        for number, row in sources.read_jsonl(path):
            if is_val(row["id"]) != (split == "val"):
                continue
            try:
                check_conversation(row)
            except ConversationError as err:
                raise sources.TaskDataError(f"{path}, line {number}: {err}") from None
            rows.append(row)
        self.rows = sources.Rows(rows)  # shuffled as every dataset is, so stop=N is a random sample

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return {"messages": self.rows[index]["messages"]}
