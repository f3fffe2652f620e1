"""Every request field checked and every size capped before any work starts.

Two request shapes: nanochat's own (`/chat/completions`: user and assistant messages, temperature,
top_k, max_tokens) and OpenAI's (`/v1/chat/completions`). Both become a `ChatRequest`; anything
else raises `RequestError`, which the app turns into a 4xx in OpenAI's error shape. Message text
is encoded as plain text, so special-token strings a user types stay ordinary characters.
"""
import dataclasses
import json

from nanochat_jax.conversation import ConversationError, render_conversation

MAX_BODY_BYTES = 512 * 1024
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_CHOICES = 8
MAX_STOPS, MAX_STOP_CHARS = 4, 64
MAX_TOP_K = 200


class RequestError(ValueError):
    """A request that cannot be served: HTTP status, message and the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclasses.dataclass
class ChatRequest:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int          # 0: no limit
    top_p: float
    seed: int | None
    n: int = 1
    stop: tuple[str, ...] = ()
    stream: bool = True
    include_usage: bool = False


def parse_body(data: bytes) -> dict:
    """The JSON object of a request body (UTF-8, at most MAX_BODY_BYTES)."""
    if len(data) > MAX_BODY_BYTES:
        raise RequestError(f"the request body is {len(data):,} bytes; the limit is {MAX_BODY_BYTES:,}", status=413)
    try:
        body = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("the request body is not valid UTF-8") from None
    except ValueError as err:
        raise RequestError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _number(body, name, low, high, default, *, integer=False, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r:.40}", name)
    if not (low < value if low_open else low <= value) or value > high:
        raise RequestError(f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return value


def _messages(body, roles) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"{len(messages):,} messages; the limit is {MAX_MESSAGES}", "messages")
    total, out = 0, []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        role, content = message.get("role"), message.get("content")
        if role not in roles:
            raise RequestError(f"{where}.role must be one of {', '.join(roles)}, got {role!r:.40}", f"{where}.role")
        if isinstance(content, list):  # OpenAI's content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"{where}.content parts must all be {{'type': 'text', 'text': str}}",
                                   f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) or not content:
            raise RequestError(f"{where}.content must be a non-empty string", f"{where}.content")
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(f"{where}.content has {len(content):,} characters; the limit is {MAX_MESSAGE_CHARS:,}",
                               f"{where}.content")
        total += len(content)
        out.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"the messages have {total:,} characters; the limit is {MAX_TOTAL_CHARS:,}", "messages")
    if out[-1]["role"] != "user":
        raise RequestError("the last message must be the user's", "messages")
    return out


def _prompt(tokenizer, messages, context: int) -> list[int]:
    """<|bos|> + the rendered turns + <|assistant_start|>; it must leave room for one new token."""
    try:
        ids, _ = render_conversation(tokenizer, {"messages": messages}, max_tokens=context + 1)
    except ConversationError as err:
        raise RequestError(str(err), "messages") from None
    ids.append(tokenizer.encode_special("<|assistant_start|>"))
    if len(ids) >= context:
        raise RequestError(f"the conversation is {len(ids):,} tokens; the model's context is {context:,}",
                           "messages", code="context_length_exceeded")
    return ids


def nanochat_request(body: dict, tokenizer, context: int) -> ChatRequest:
    """nanochat's protocol and limits; max_tokens (default 512) is cut to what fits the context."""
    messages = _messages(body, ("user", "assistant"))
    temperature = _number(body, "temperature", 0, 2, 0.8)
    top_k = _number(body, "top_k", 1, MAX_TOP_K, 50, integer=True)
    max_tokens = _number(body, "max_tokens", 1, 4096, 512, integer=True)
    seed = _number(body, "seed", 0, 2**63 - 1, None, integer=True)
    prompt = _prompt(tokenizer, messages, context)
    return ChatRequest(prompt, min(max_tokens, context - len(prompt)), temperature, top_k, 1.0, seed)


def openai_request(body: dict, tokenizer, context: int) -> ChatRequest:
    """OpenAI's chat completions fields (plus `top_k`); an explicit max_tokens must fit the context."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    messages = _messages(body, ("system", "user", "assistant"))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, 1, 2**31, None, integer=True)
    temperature = _number(body, "temperature", 0, 2, 1.0)
    top_p = _number(body, "top_p", 0, 1, 1.0, low_open=True)
    top_k = _number(body, "top_k", 0, MAX_TOP_K, 0, integer=True)
    seed = _number(body, "seed", -2**63, 2**63 - 1, None, integer=True)
    n = _number(body, "n", 1, MAX_CHOICES, 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError("'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if (not isinstance(stop, list) or len(stop) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings of at most "
                           f"{MAX_STOP_CHARS} characters", "stop")
    prompt = _prompt(tokenizer, messages, context)
    room = context - len(prompt)
    if max_tokens is not None and max_tokens > room:
        raise RequestError(f"'{name}' is {max_tokens:,} but the prompt of {len(prompt):,} tokens leaves room for "
                           f"{room:,} in the model's context of {context:,}", name, code="context_length_exceeded")
    return ChatRequest(prompt, room if max_tokens is None else max_tokens, temperature, top_k, top_p, seed, n,
                       tuple(stop), stream, bool(options.get("include_usage", False)))
