"""nanochat's own tokenizer (a tiktoken byte-level BPE) behind the interface of `tokenizer.Tokenizer`.

Models imported from nanochat come with it: its nine special tokens sit at the end of the
vocabulary (not at 1..9), so callers take ids only from `encode_special` and `bos_id`. As in
nanochat, text is encoded with `encode_ordinary`: special-token strings typed in text are plain
text. On disk it is one JSON file (ranks as base64 bytes), never a pickle, plus token_bytes.npy.
"""
import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import tiktoken

from nanochat_jax import paths
from nanochat_jax.tokenizer import SPECIAL_TOKENS, TOKEN_BYTES_FILE, save_files

ENCODING_FILE = "tiktoken.json"
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


class TiktokenTokenizer:
    def __init__(self, encoding: tiktoken.Encoding):
        missing = [name for name in SPECIAL_TOKENS if name not in encoding.special_tokens_set]
        if missing:
            raise ValueError(f"not a nanochat tokenizer: no special tokens {', '.join(missing)}")
        self.encoding = encoding
        self._specials = {name: encoding.encode_single_token(name) for name in SPECIAL_TOKENS}
        self._special_ids = frozenset(encoding.encode_single_token(s) for s in encoding.special_tokens_set)

    # ---- files ------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory) -> "TiktokenTokenizer":
        path = Path(directory) / ENCODING_FILE
        if not path.exists():
            raise FileNotFoundError(f"no tiktoken tokenizer at {path}")
        spec = json.loads(path.read_text())
        ranks = {base64.b64decode(token): rank for token, rank in spec["mergeable_ranks"]}
        return cls(tiktoken.Encoding(name=spec["name"], pat_str=spec["pat_str"], mergeable_ranks=ranks,
                                     special_tokens=spec["special_tokens"]))

    def save(self, directory) -> None:
        """Write the encoding as JSON and its token_bytes (for bits per byte), each atomically."""
        enc = self.encoding
        ranks = sorted(enc._mergeable_ranks.items(), key=lambda item: item[1])
        spec = {"name": enc.name, "pat_str": enc._pat_str, "special_tokens": enc._special_tokens,
                "mergeable_ranks": [[base64.b64encode(token).decode(), rank] for token, rank in ranks]}
        save_files(directory, {ENCODING_FILE: lambda f: f.write(json.dumps(spec).encode()),
                               TOKEN_BYTES_FILE: lambda f: np.save(f, self.token_bytes())})

    # ---- vocabulary -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def bos_id(self) -> int:
        return self._specials["<|bos|>"]

    def encode_special(self, name: str) -> int:
        if name not in self._specials:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self._specials[name]

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def id_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b'' for special tokens)."""
        return b"" if self.is_special(token_id) else self.encoding.decode_single_token_bytes(int(token_id))

    def token_bytes(self) -> np.ndarray:
        """int32 (vocab,) byte length of each token, 0 for specials: bits-per-byte's denominator."""
        return np.array([len(self.id_to_bytes(i)) for i in range(self.vocab_size)], dtype=np.int32)

    # ---- encoding ---------------------------------------------------------------------------
    def encode(self, text, prepend=None, append=None, num_threads: int = 0):
        """Plain-text encoding of a str (-> ids) or a list of str (-> list of ids, in threads).

        `prepend`/`append` take an id or a special-token name and are added to every row.
        """
        pre = [] if prepend is None else [self._as_id(prepend)]
        post = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return pre + self.encoding.encode_ordinary(text) + post
        texts = list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a str or a list of str")
        rows = self.encoding.encode_ordinary_batch(texts, num_threads=num_threads or os.cpu_count())
        return [pre + ids + post for ids in rows]

    def _as_id(self, token) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def decode(self, ids) -> str:
        """Text of a token sequence; special tokens appear as their names."""
        return self.encoding.decode([int(i) for i in ids])


def load_tiktoken(encoding: str, tiktoken_dir=None) -> tiktoken.Encoding:
    """tiktoken's `encoding`, taken from `<tiktoken_dir>/<encoding>.tiktoken` when a folder is given.

    tiktoken looks its files up in $TIKTOKEN_CACHE_DIR under the sha1 of their download URL (and
    checks their sha256), so a copy placed under that name loads with no network. The cache is
    the user's $TIKTOKEN_CACHE_DIR, else $NANOCHAT_BASE_DIR/tiktoken_cache.
    """
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or paths.base_dir() / "tiktoken_cache")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    if tiktoken_dir is not None:
        source = Path(tiktoken_dir) / f"{encoding}.tiktoken"
        if not source.is_file():
            raise FileNotFoundError(f"no {source.name} in {tiktoken_dir}")
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / hashlib.sha1(TIKTOKEN_URL.format(encoding).encode()).hexdigest()
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)  # contents only: the source may be read-only
        os.replace(tmp, target)
    return tiktoken.get_encoding(encoding)
