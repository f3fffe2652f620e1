"""Conversation rendering: exact ids and masks, hand-written against a one-id-per-character fake
tokenizer (character c is ord(c) + 100, the nine specials are 1..9), plus one check against the
real tokenizer when it can be imported."""
import copy
import inspect

import pytest

from nanochat_jax.conversation import ConversationError, render_conversation, render_for_completion

SPECIALS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
BOS, US, UE, AS, AE, PS, PE, OS, OE = range(1, 10)


class FakeTokenizer:
    bos_id = BOS

    def encode(self, text):
        return [ord(c) + 100 for c in text]

    def encode_special(self, name):
        return SPECIALS.index(name) + 1

    def decode(self, ids):
        return "".join(SPECIALS[i - 1] if i < 100 else chr(i - 100) for i in ids)


TOK = FakeTokenizer()


def convo(*messages):
    return {"messages": [{"role": role, "content": content} for role, content in messages]}


HI_YO = convo(("user", "hi"), ("assistant", "yo"))
# h=204 i=205 y=221 o=211
HI_YO_IDS = [BOS, US, 204, 205, UE, AS, 221, 211, AE]
HI_YO_MASK = [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_two_turns():
    assert render_conversation(TOK, HI_YO) == (HI_YO_IDS, HI_YO_MASK)
    assert TOK.decode(HI_YO_IDS) == "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>yo<|assistant_end|>"


def test_may_end_on_a_user_turn():
    ids, mask = render_conversation(TOK, convo(("user", "hi"), ("assistant", "yo"), ("user", "ok")))
    assert ids == HI_YO_IDS + [US, 211, 207, UE]  # o=211 k=207
    assert mask == HI_YO_MASK + [0, 0, 0, 0]


def test_system_message_is_merged_into_the_first_user_message():
    conversation = convo(("system", "s"), ("user", "u"), ("assistant", "yo"))
    original = copy.deepcopy(conversation)
    ids, mask = render_conversation(TOK, conversation)
    assert ids == [BOS, US, 215, 110, 110, 217, UE, AS, 221, 211, AE]  # "s\n\nu": s=215 \n=110 u=217
    assert mask == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert (ids, mask) == render_conversation(TOK, convo(("user", "s\n\nu"), ("assistant", "yo")))
    assert conversation == original


def test_tool_parts():
    parts = [{"type": "text", "text": "a"}, {"type": "python", "text": "1+1"},
             {"type": "python_output", "text": "2"}, {"type": "text", "text": "b"}]
    ids, mask = render_conversation(TOK, convo(("user", "q"), ("assistant", parts)))
    # q=213 a=197 1=149 +=143 2=150 b=198
    assert ids == [BOS, US, 213, UE, AS, 197, PS, 149, 143, 149, PE, OS, 150, OE, 198, AE]
    assert mask == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1]


def test_string_content_equals_one_text_part():
    as_parts = convo(("user", "hi"), ("assistant", [{"type": "text", "text": "yo"}]))
    assert render_conversation(TOK, as_parts) == (HI_YO_IDS, HI_YO_MASK)


@pytest.mark.parametrize("max_tokens", [1, 5, 9, 2048])
def test_truncation(max_tokens):
    assert render_conversation(TOK, HI_YO, max_tokens=max_tokens) == (HI_YO_IDS[:max_tokens],
                                                                       HI_YO_MASK[:max_tokens])


def test_special_token_strings_in_text_stay_plain_text():
    ids, mask = render_conversation(TOK, convo(("user", "<|assistant_end|>"), ("assistant", "<|bos|>")))
    assert ids == [BOS, US, *TOK.encode("<|assistant_end|>"), UE, AS, *TOK.encode("<|bos|>"), AE]
    assert ids.count(AE) == 1 and ids.count(BOS) == 1
    assert sum(mask) == len("<|bos|>") + 1


def test_render_for_completion():
    assert render_for_completion(TOK, HI_YO) == [BOS, US, 204, 205, UE, AS]
    conversation = convo(("system", "s"), ("user", "u"), ("assistant", "yo"), ("user", "hi"), ("assistant", "x"))
    original = copy.deepcopy(conversation)
    prompt = render_for_completion(TOK, conversation)
    assert prompt == [BOS, US, 215, 110, 110, 217, UE, AS, 221, 211, AE, US, 204, 205, UE, AS]
    assert conversation == original


def test_render_for_completion_does_not_truncate():
    prompt = render_for_completion(TOK, convo(("user", "z" * 3000), ("assistant", "yo")))
    assert len(prompt) == 3000 + 4 and prompt[-1] == AS


def part(**fields):
    return convo(("user", "hi"), ("assistant", [{"type": "text", "text": "ok"}, fields]))


MALFORMED = [
    (["hi"], "must be a dict with a 'messages' list, got list"),
    ({}, "must be a dict with a 'messages' list"),
    ({"messages": "hi"}, "must be a dict with a 'messages' list"),
    ({"messages": []}, "has no messages"),
    ({"messages": ["hi"]}, "message 0: expected a dict with 'role' and 'content', got str"),
    ({"messages": [{"content": "hi"}]}, "message 0 has no 'role'"),
    (convo(("tool", "hi")), "message 0: unknown role 'tool'"),
    (convo(("assistant", "yo")), "message 0: expected role 'user', got 'assistant'"),
    (convo(("user", "hi"), ("user", "hi")), "message 1: expected role 'assistant', got 'user': .*alternate"),
    (convo(("user", "hi"), ("assistant", "yo"), ("system", "s")),
     "message 2: expected role 'user', got 'system': a system message is only allowed as the first"),
    (convo(("system", "s"), ("system", "s"), ("user", "hi")), "message 1: .*only allowed as the first"),
    (convo(("system", "s"), ("assistant", "yo")), "message 1: expected role 'user', got 'assistant'"),
    (convo(("system", "s")), "message 0: a system message must be followed by a user message"),
    ({"messages": [{"role": "user"}]}, r"message 0 \(user\) has no 'content'"),
    (convo(("user", "")), r"message 0 \(user\): content must be a non-empty string, got str ''"),
    (convo(("user", ["hi"])), r"message 0 \(user\): content must be a non-empty string, got list"),
    (convo(("system", ""), ("user", "hi")), r"message 0 \(system\): content must be a non-empty string"),
    (convo(("user", "hi"), ("assistant", 7)), r"message 1 \(assistant\): content must be a string or a list"),
    (convo(("user", "hi"), ("assistant", None)), r"message 1 \(assistant\): .*got NoneType"),
    (convo(("user", "hi"), ("assistant", "")), r"message 1 \(assistant\): content is empty"),
    (convo(("user", "hi"), ("assistant", [])), r"message 1 \(assistant\): content is empty"),
    (convo(("user", "hi"), ("assistant", ["yo"])), r"message 1 \(assistant\), part 0: expected a dict"),
    (part(type="image", text="x"), r"message 1 \(assistant\), part 1: unknown part type 'image'"),
    (part(text="x"), r"part 1: unknown part type None"),
    (part(type="python"), r"part 1 \(python\): 'text' must be a string, got NoneType"),
    (part(type="python_output", text=2), r"part 1 \(python_output\): 'text' must be a string, got int"),
]


@pytest.mark.parametrize("conversation, match", MALFORMED)
def test_malformed_conversations_raise(conversation, match):
    with pytest.raises(ConversationError, match=match):
        render_conversation(TOK, conversation)
    with pytest.raises(ConversationError, match=match):
        render_for_completion(TOK, conversation)


@pytest.mark.parametrize("max_tokens", [0, -1, 2.5])
def test_bad_max_tokens(max_tokens):
    with pytest.raises(ConversationError, match="max_tokens must be a positive int"):
        render_conversation(TOK, HI_YO, max_tokens=max_tokens)


@pytest.mark.parametrize("conversation, match", [
    (convo(("user", "hi"), ("assistant", "yo"), ("user", "ok")), "message 2: .*got role 'user'"),
    (convo(("system", "s"), ("user", "hi")), "message 1: .*end with the assistant message"),
])
def test_render_for_completion_needs_a_final_assistant_message(conversation, match):
    with pytest.raises(ConversationError, match=match):
        render_for_completion(TOK, conversation)


def test_errors_are_value_errors():
    assert issubclass(ConversationError, ValueError)


def test_real_tokenizer():
    try:
        from nanochat_jax.tokenizer import train_tokenizer
    except ImportError:
        pytest.skip("nanochat_jax.tokenizer.train_tokenizer is not available")
    import argparse
    import difflib
    tok = train_tokenizer(inspect.getsource(argparse).splitlines() + inspect.getsource(difflib).splitlines(),
                          vocab_size=512)
    user, answer = "what is <|assistant_end|> 1+1?", "let me compute"
    parts = [{"type": "text", "text": answer}, {"type": "python", "text": "1+1"},
             {"type": "python_output", "text": "2"}]
    ids, mask = render_conversation(tok, convo(("system", "be brief"), ("user", user), ("assistant", parts)))
    sp = {name: tok.encode_special(name) for name in SPECIALS}
    assert ids[0] == tok.bos_id == sp["<|bos|>"]
    merged, text, expr, out = (tok.encode(t) for t in ("be brief\n\n" + user, answer, "1+1", "2"))
    expected = [(tok.bos_id, 0), (sp["<|user_start|>"], 0), *((i, 0) for i in merged), (sp["<|user_end|>"], 0),
                (sp["<|assistant_start|>"], 0), *((i, 1) for i in text),
                (sp["<|python_start|>"], 1), *((i, 1) for i in expr), (sp["<|python_end|>"], 1),
                (sp["<|output_start|>"], 0), *((i, 0) for i in out), (sp["<|output_end|>"], 0),
                (sp["<|assistant_end|>"], 1)]
    assert list(zip(ids, mask)) == expected
    assert ids.count(sp["<|assistant_end|>"]) == 1  # the one in the user's text stayed plain text
    assert tok.decode(merged) == "be brief\n\n" + user
