"""Chat conversations as token ids, with a mask of the tokens the model is trained to produce.

A conversation is `{"messages": [{"role": ..., "content": ...}, ...]}`: an optional leading
`system` message, then `user` and `assistant` turns alternating, starting with `user`. As in
nanochat, the rendering is

    <|bos|>
    <|user_start|> text <|user_end|>                          (per user turn)
    <|assistant_start|> content <|assistant_end|>             (per assistant turn)

and the mask is 1 exactly on what the assistant writes: its content and its `<|assistant_end|>`
(so the model learns to stop), including the tool calls it makes
(`<|python_start|> expr <|python_end|>`), but not the tool outputs it is shown
(`<|output_start|> value <|output_end|>`), nor anything else. nanochat has no system token, so a
system message is merged into the first user message as `system + "\n\n" + user`.

Message text goes through `tok.encode`, which never produces special tokens, so a user cannot
forge a turn boundary by typing `<|assistant_end|>`. The tokenizer is duck-typed: `encode(text)`,
`encode_special(name)` and `bos_id`.
"""

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


class ConversationError(ValueError):
    """A conversation that cannot be rendered; the message names the offending message index."""


def render_conversation(tok, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
    """Token ids and a same-length 0/1 training mask, both cut to the first `max_tokens`.

    The conversation may end on either role.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConversationError(f"max_tokens must be a positive int, got {max_tokens!r}")
    ids, mask = _render(tok, _turns(conversation))
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tok, conversation) -> list[int]:
    """The prompt for sampling the assistant's reply: every message but the last (which must be
    the assistant's, e.g. the reference answer of an eval task), then `<|assistant_start|>`.

    Unlike nanochat, the prompt is not cut at 2048 tokens: a prompt cut short and then followed
    by `<|assistant_start|>` is not one the model has seen, so its length is the caller's call.
    """
    turns = _turns(conversation)
    if turns[-1][0] != "assistant":
        last = len(conversation["messages"]) - 1
        raise ConversationError(f"message {last}: render_for_completion needs the conversation to end "
                                f"with the assistant message it replaces, got role {turns[-1][0]!r}")
    ids, _ = _render(tok, turns[:-1])
    return ids + [tok.encode_special("<|assistant_start|>")]


def check_conversation(conversation) -> None:
    """Raise ConversationError (naming the message) unless `conversation` renders."""
    _turns(conversation)


def _turns(conversation) -> list[tuple[str, object]]:
    """Validate the conversation; return its (role, content) turns, the system message merged."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ConversationError("a conversation must be a dict with a 'messages' list, "
                                f"got {_describe(conversation)}")
    messages = conversation["messages"]
    if not messages:
        raise ConversationError("the conversation has no messages")
    has_system = _role(0, messages[0]) == "system"
    for i, message in enumerate(messages):
        role, turn = _role(i, message), i - has_system
        expected = "system" if turn < 0 else ("user", "assistant")[turn % 2]
        if role != expected:
            why = ("a system message is only allowed as the first message" if role == "system" else
                   "after the optional system message, roles alternate user, assistant, user, ...")
            raise ConversationError(f"message {i}: expected role {expected!r}, got {role!r}: {why}")
        if "content" not in message:
            raise ConversationError(f"message {i} ({role}) has no 'content'")
        _check_content(i, role, message["content"])
    if has_system and len(messages) == 1:
        raise ConversationError("message 0: a system message must be followed by a user message")
    turns = [(m["role"], m["content"]) for m in messages[has_system:]]
    if has_system:
        turns[0] = ("user", messages[0]["content"] + "\n\n" + turns[0][1])
    return turns


def _role(i: int, message) -> str:
    if not isinstance(message, dict):
        raise ConversationError(f"message {i}: expected a dict with 'role' and 'content', "
                                f"got {_describe(message)}")
    if "role" not in message:
        raise ConversationError(f"message {i} has no 'role'")
    role = message["role"]
    if role not in ROLES:
        raise ConversationError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
    return role


def _check_content(i: int, role: str, content) -> None:
    if role != "assistant":
        if not isinstance(content, str) or not content:
            raise ConversationError(f"message {i} ({role}): content must be a non-empty string, "
                                    f"got {_describe(content)}")
        return
    if not isinstance(content, (str, list)):
        raise ConversationError(f"message {i} (assistant): content must be a string or a list of parts, "
                                f"got {_describe(content)}")
    if not content:
        raise ConversationError(f"message {i} (assistant): content is empty")
    if isinstance(content, list):
        for j, part in enumerate(content):
            where = f"message {i} (assistant), part {j}"
            if not isinstance(part, dict):
                raise ConversationError(f"{where}: expected a dict with 'type' and 'text', got {_describe(part)}")
            if part.get("type") not in PART_TYPES:
                raise ConversationError(f"{where}: unknown part type {part.get('type')!r}; "
                                        f"expected one of {PART_TYPES}")
            if not isinstance(part.get("text"), str):
                raise ConversationError(f"{where} ({part['type']}): 'text' must be a string, "
                                        f"got {_describe(part.get('text'))}")


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _render(tok, turns) -> tuple[list[int], list[int]]:
    """Render validated turns (untruncated)."""
    ids, mask = [tok.bos_id], [0]

    def add(token_ids: list[int], trained: int) -> None:
        ids.extend(token_ids)
        mask.extend([trained] * len(token_ids))

    def special(name: str) -> list[int]:
        return [tok.encode_special(name)]

    for role, content in turns:
        if role == "user":
            add(special("<|user_start|>") + tok.encode(content) + special("<|user_end|>"), 0)
            continue
        add(special("<|assistant_start|>"), 0)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            text = tok.encode(part["text"])
            if part["type"] == "text":
                add(text, 1)
            elif part["type"] == "python":
                add(special("<|python_start|>") + text + special("<|python_end|>"), 1)
            else:  # python_output: shown to the model, not written by it
                add(special("<|output_start|>") + text + special("<|output_end|>"), 0)
        add(special("<|assistant_end|>"), 1)
    return ids, mask
