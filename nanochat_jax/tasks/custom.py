"""CustomJSON: conversations from a JSONL file of your own (nanochat's identity conversations,
or any chat data), one a line: `{"messages": [...]}`, or a bare list of messages as in nanochat's
`identity_conversations.jsonl`. Blank lines are skipped; the file's order is kept."""
from pathlib import Path

from nanochat_jax.conversation import ConversationError, check_conversation
from nanochat_jax.tasks import sources
from nanochat_jax.tasks.base import Task


class CustomJSON(Task):

    def __init__(self, path: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        if not self.path.is_file():
            raise sources.TaskDataError(f"{self.path}: no such conversation file")
        self.conversations = [self._conversation(n, value) for n, value in sources.read_jsonl(self.path)]

    def _conversation(self, number: int, value) -> dict:
        conversation = {"messages": value} if isinstance(value, list) else value
        try:
            check_conversation(conversation)
        except ConversationError as err:
            raise sources.TaskDataError(f"{self.path}, line {number}: {err}") from None
        if not any(message["role"] == "assistant" for message in conversation["messages"]):
            raise sources.TaskDataError(f"{self.path}, line {number}: the conversation has no "
                                        "assistant message, so nothing to learn from")
        return {"messages": conversation["messages"]}

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]

