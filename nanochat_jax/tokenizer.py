"""Byte-level BPE tokenizer: SentencePiece training, encoding, decoding and per-token byte counts.

The trained model is a SentencePiece BPE with byte fallback (every UTF-8 text round-trips
exactly), digits split one by one, no text normalisation, and nanochat's nine special tokens as
*control* symbols at fixed ids 1..9 (id 0 is SentencePiece's unused `<unk>`). Pieces still start
at spaces but may join letters with punctuation (`'s`, `said,`, `.\nAnd`), much as nanochat's
regex chunks `'s` and `"The` do: SentencePiece's default split between Unicode scripts forbids
that and cost 3.5-27% in bytes/token (docs/benchmarks.md). Control symbols are never matched in
text, so a user typing `<|assistant_end|>` gets plain-text tokens, not the control token; only
`encode_special` yields special ids.
"""
import io
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
)
SPECIAL_IDS = {name: 1 + i for i, name in enumerate(SPECIAL_TOKENS)}
SPACE_META = "\u2581"  # SentencePiece's stand-in for a space; a literal one in text must be escaped
MODEL_FILE, TOKEN_BYTES_FILE = "tokenizer.model", "token_bytes.npy"
MAX_PIECE_CHARS = 32  # nanochat's longest tokens are 32 bytes; SentencePiece's default cap is 16


def train_tokenizer(sentences: Iterable[str], vocab_size: int, *, num_threads: int = 0,
                    input_sentence_size: int = 0, max_sentence_length: int = 16384,
                    verbose: bool = False) -> "Tokenizer":
    """Train on an iterable of sentences (pieces of documents, see `split_for_training`).

    `input_sentence_size` > 0 makes SentencePiece keep a uniform sample of that many sentences,
    which bounds memory on large corpora. Training sees at most `max_sentence_length` bytes per
    sentence; `split_for_training` keeps pieces within that. `verbose` lets SentencePiece log its
    progress to stderr (a line per 100 merges), the only progress it can show: it holds the GIL.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 2:
        raise ValueError(f"vocab_size {vocab_size} leaves no room beyond 256 bytes and {len(SPECIAL_TOKENS)} specials")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.9999, split_digits=True,
        split_by_unicode_script=False, max_sentencepiece_length=MAX_PIECE_CHARS,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, max_sentence_length=max_sentence_length,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, control_symbols=list(SPECIAL_TOKENS),
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count(), train_extremely_large_corpus=vocab_size > 32768,
        minloglevel=0 if verbose else 2,
    )
    return Tokenizer(model.getvalue())


TRAINING_BYTES_PER_CHAR = 18  # SentencePiece's peak RSS per training character (measured: 1.08 GB for 60M)


def max_training_pieces(memory_bytes: int | None = None, piece_chars: int = 4096) -> int:
    """How many training pieces fit in half of this machine's RAM (SentencePiece keeps them all)."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, memory_bytes // 2 // (TRAINING_BYTES_PER_CHAR * piece_chars))


def split_for_training(text: str, max_len: int = 4096) -> Iterable[str]:
    """A document as SentencePiece training "sentences": consecutive pieces of at most `max_len`
    characters, cut after a newline where one is near. Newlines stay inside the pieces, so the
    vocabulary learns tokens such as ".\n\n" and "):\n" (about 5% fewer tokens on prose and
    7% on code than training on single lines)."""
    start = 0
    while start < len(text):
        end = min(start + max_len, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        yield text[start:end]
        start = end


def training_sentences(docs, max_chars: int, stats: dict):
    """Training pieces of `docs` until `max_chars` characters have been read, with a progress bar.
    Counts documents, characters and pieces into `stats` as it goes."""
    with tqdm(total=max_chars, unit="char", unit_scale=True, desc="reading", file=sys.stderr) as bar:
        for doc in docs:
            stats["documents"] += 1
            stats["chars"] += len(doc)
            bar.update(len(doc))
            for line in split_for_training(doc):
                stats["sentences"] += 1
                yield line
            if stats["chars"] >= max_chars:
                return


class Tokenizer:
    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        for name, expected in SPECIAL_IDS.items():
            if self.sp.piece_to_id(name) != expected or not self.sp.is_control(expected):
                raise ValueError(f"not a nanochat-jax tokenizer: {name} is not control id {expected}")
        self._space_meta_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_META.encode()]

    def __getstate__(self):  # pickled as its model, for data-loader worker processes
        return {"model_proto": self.model_proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    # ---- files ------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory) -> "Tokenizer":
        path = Path(directory) / MODEL_FILE
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer at {path}; train one with `python -m launch.tok_train`")
        return cls(path.read_bytes())

    def save(self, directory) -> None:
        """Write the model and its token_bytes (for bits per byte), each atomically."""
        save_files(directory, {MODEL_FILE: lambda f: f.write(self.model_proto),
                               TOKEN_BYTES_FILE: lambda f: np.save(f, self.token_bytes())})

    # ---- vocabulary -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return SPECIAL_IDS["<|bos|>"]

    def encode_special(self, name: str) -> int:
        if name not in SPECIAL_IDS:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return SPECIAL_IDS[name]

    def is_special(self, token_id: int) -> bool:
        return self.sp.is_control(token_id) or self.sp.is_unknown(token_id)

    def id_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b'' for special tokens)."""
        if self.is_special(token_id):
            return b""
        piece = self.sp.id_to_piece(token_id)
        if self.sp.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SPACE_META, " ").encode("utf-8")

    def token_bytes(self) -> np.ndarray:
        """int32 (vocab,) byte length of each token, 0 for specials: bits-per-byte's denominator."""
        return np.array([len(self.id_to_bytes(i)) for i in range(self.vocab_size)], dtype=np.int32)

    # ---- encoding ---------------------------------------------------------------------------
    def _encode_one(self, text: str) -> list[int]:
        if SPACE_META not in text:
            return self.sp.encode(text)
        ids = []
        for i, part in enumerate(text.split(SPACE_META)):
            if i:
                ids += self._space_meta_ids
            ids += self.sp.encode(part)
        return ids

    def encode(self, text, prepend=None, append=None, num_threads: int = 0):
        """Plain-text encoding of a str (-> ids) or a list of str (-> list of ids, in threads).

        `prepend`/`append` take an id or a special-token name and are added to every row.
        """
        pre = [] if prepend is None else [self._as_id(prepend)]
        post = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return pre + self._encode_one(text) + post
        texts = list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a str or a list of str")
        plain = [i for i, t in enumerate(texts) if SPACE_META not in t]
        rows = [None] * len(texts)
        encoded = self.sp.encode([texts[i] for i in plain], num_threads=num_threads or os.cpu_count())
        for i, ids in zip(plain, encoded):
            rows[i] = ids
        for i, t in enumerate(texts):
            if rows[i] is None:
                rows[i] = self._encode_one(t)
        return [pre + ids + post for ids in rows]

    def _as_id(self, token) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def decode(self, ids) -> str:
        """Text of a token sequence; special tokens appear as their names."""
        ids = [int(i) for i in ids]
        out, run = [], []
        for token_id in ids:
            if self.is_special(token_id):
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(token_id) if self.sp.is_control(token_id) else "")
                run = []
            else:
                run.append(token_id)
        out.append(self.sp.decode(run))
        return "".join(out)


def save_files(directory, writers: dict) -> None:
    """Write each `name: write(file)` into `directory` atomically (a .tmp renamed into place), so a
    tokenizer directory never holds half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, write in writers.items():
        tmp = directory / (name + ".tmp")
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, directory / name)


def load_tokenizer(directory):
    """The tokenizer saved in `directory`, of the kind its files say: SentencePiece (`tokenizer.model`,
    trained here) or tiktoken (`tiktoken.json`, nanochat's, from an imported checkpoint)."""
    from nanochat_jax.tokenizer_tiktoken import ENCODING_FILE, TiktokenTokenizer  # it imports this module
    if (Path(directory) / ENCODING_FILE).exists():
        return TiktokenTokenizer.load(directory)
    return Tokenizer.load(directory)
