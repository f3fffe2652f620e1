"""Generated tokens as text for streaming: whole UTF-8 characters only, and OpenAI-style stop strings.

A multi-byte character can be split over several byte tokens; decoding such a prefix ends in
U+FFFD. As nanochat does, text is held back until it decodes cleanly, but only the tokens since
the last clean point are decoded again (decoding is additive across whole characters), so a long
reply costs linear, not quadratic, time.
"""

MAX_CHAR_TOKENS = 4  # a UTF-8 character has at most 4 bytes, so at most 4 byte tokens


class StreamingDecoder:
    """Turns tokens, pushed one at a time, into new text that never ends in half a character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pending = tokenizer, []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < MAX_CHAR_TOKENS:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end shows as U+FFFD)."""
        text, self.pending = self.tokenizer.decode(self.pending) if self.pending else "", []
        return text


class StopMatcher:
    """Cuts a text stream at the first of `stops`. Text that might be the start of a stop string
    is held back until it is known not to be, so no part of a stop string is ever sent."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = [s for s in stops if s], "", False

    def push(self, text: str) -> str:
        """The text that is safe to send now; sets `stopped` once a stop string has appeared."""
        if self.stopped:
            return ""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.held = self.held[:min(hits)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out
