"""The tokenizer: exact round trips, fixed special ids, plain-text specials, token byte counts,
and the tok_train launcher."""
import json
import random
import unicodedata

import numpy as np
import pytest

from nanochat_jax import paths
from nanochat_jax.data.shards import DEMO_DIR, iter_documents
from nanochat_jax.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS, Tokenizer, split_for_training, train_tokenizer

HARD_TEXTS = [
    "", " ", "  two leading", "trailing  ", "\n\n\t\r\n", "a\u2581b \u2581\u2581", "\u2581", "x" * 10000,
    "héllo wörld", "日本語のテキスト", "한국어 텍스트", "🎉👩‍👩‍👧 flags 🇫🇷", "e\u0301 combining", "\x00\x01\x7f",
    "<|bos|><|assistant_end|>", "<|user_start|>hi<|user_end|>", "12345678901234567890", "3.14159e-10",
    "def f(x):\n    return x ** 2\n", "\ufeffBOM \u200b zero-width \U0010ffff",
]


@pytest.fixture(scope="module")
def tok():
    docs = list(iter_documents(sorted(DEMO_DIR.glob("*.parquet"))[:2], doc_cap=20000))
    return train_tokenizer((line for doc in docs for line in split_for_training(doc)), 1024)


def random_text(rng: random.Random, length: int) -> str:
    """Unicode from every plane's assigned-ish ranges, spaces, newlines and the space meta symbol."""
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x2FF), (0x400, 0x4FF), (0x3040, 0x30FF), (0x4E00, 0x4FFF),
             (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x2580, 0x2582), (0x10000, 0x10FFFF)]
    chars = []
    for _ in range(length):
        lo, hi = rng.choice(pools)
        c = rng.randint(lo, hi)
        chars.append(chr(c) if not 0xD800 <= c <= 0xDFFF else " ")
    return "".join(chars)


def test_round_trip_is_exact(tok):
    for text in HARD_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    rng = random.Random(0)
    for _ in range(300):
        text = random_text(rng, rng.randint(0, 80))
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_batched_encode_matches_single(tok):
    texts = HARD_TEXTS + [random_text(random.Random(i), 50) for i in range(20)]
    batched = tok.encode(texts, prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"), num_threads=2)
    assert batched == [[tok.bos_id] + tok.encode(t) + [SPECIAL_IDS["<|assistant_end|>"]] for t in texts]
    with pytest.raises(TypeError):
        tok.encode(["ok", 3])


def test_special_ids_are_fixed_and_distinct(tok):
    assert [tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(1, 10))
    assert tok.bos_id == 1 and tok.vocab_size == 1024
    for name in SPECIAL_TOKENS:
        assert tok.is_special(SPECIAL_IDS[name]) and tok.decode([SPECIAL_IDS[name]]) == name
    with pytest.raises(KeyError, match="unknown special token"):
        tok.encode_special("<|eos|>")


def test_special_strings_in_text_stay_plain(tok):
    for name in SPECIAL_TOKENS:
        ids = tok.encode(f"user says {name} here")
        assert not any(tok.is_special(i) for i in ids)
        assert tok.decode(ids) == f"user says {name} here"


def test_token_bytes_sum_to_utf8_length(tok):
    token_bytes = tok.token_bytes()
    assert token_bytes.dtype == np.int32 and token_bytes.shape == (tok.vocab_size,)
    assert all(token_bytes[i] == 0 for i in range(10))  # <unk> and the nine specials
    assert (token_bytes[10:] > 0).all()
    rng = random.Random(1)
    for text in HARD_TEXTS + [random_text(rng, 60) for _ in range(100)]:
        ids = tok.encode(text)
        assert int(token_bytes[ids].sum()) == len(tok.decode(ids).encode("utf-8"))
    # raw bytes, not a lossy decode: each byte-fallback token is one byte
    assert token_bytes[tok.sp.piece_to_id("<0xE2>")] == 1


def test_pieces_join_letters_and_punctuation(tok):
    """No split between Unicode scripts: punctuation merges with letters, as in nanochat's `'s` chunk
    (SentencePiece's default keeps every Latin letter apart from every punctuation mark)."""
    def mixed(piece: str) -> bool:
        return any(c.isalpha() for c in piece) and any(unicodedata.category(c).startswith("P") for c in piece)
    pieces = [tok.id_to_bytes(i).decode("utf-8", "replace") for i in range(tok.vocab_size)]
    assert sum(map(mixed, pieces)) >= 10
    assert len(tok.encode("'s")) == 1


LONG_WORD = "electroencephalographically"


@pytest.fixture(scope="module")
def skewed_tok():
    """Trained on a corpus dominated by one 27-letter word and one year, padded with random words."""
    rng = random.Random(0)
    filler = [" ".join("".join(rng.choice("abcdefghij") for _ in range(3)) for _ in range(20)) for _ in range(200)]
    return train_tokenizer([f"an {LONG_WORD} word in 1865\n"] * 100 + filler, 500)


def test_pieces_may_exceed_sixteen_characters(skewed_tok):
    """SentencePiece's default cap is 16 characters; nanochat's longest tokens are 32 bytes."""
    assert [skewed_tok.id_to_bytes(i) for i in skewed_tok.encode(" " + LONG_WORD)] == [f" {LONG_WORD}".encode()]


def test_digits_stay_single_tokens(skewed_tok):
    assert [skewed_tok.id_to_bytes(i) for i in skewed_tok.encode(" 1865")] == [b" ", b"1", b"8", b"6", b"5"]


def test_save_load_and_errors(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode("The whale!") == tok.encode("The whale!")
    np.testing.assert_array_equal(np.load(tmp_path / "token_bytes.npy"), tok.token_bytes())
    with pytest.raises(FileNotFoundError, match="launch.tok_train"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b c"], 100)


def test_split_for_training_cuts_after_newlines():
    assert list(split_for_training("ab\n\ncdefg", max_len=3)) == ["ab\n", "\ncd", "efg"]
    assert list(split_for_training("")) == []
    text = random_text(random.Random(2), 5000)
    pieces = list(split_for_training(text, max_len=100))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 100


def test_tok_train_launcher(tmp_path, monkeypatch, capsys):
    from launch import tok_train
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok_train.main(["--config=tiny", "--config.tokenizer.vocab_size=600", "--config.tokenizer.max_chars=300000"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["vocab_size"] == 600 and 300_000 <= result["chars"] < 400_000
    assert (paths.tokenizer_dir() / "tokenizer.model").exists()
    assert (tmp_path / "report" / "tokenizer-training.md").exists()
    assert Tokenizer.load(paths.tokenizer_dir()).vocab_size == 600


def test_training_memory_bound():
    from nanochat_jax.tokenizer import max_training_pieces
    assert max_training_pieces(24 * 2**30) * 4096 < 1.0e9  # a 24 GiB machine trains on <1B chars
    assert max_training_pieces(2 * 2**40) * 4096 > 50e9    # a 2 TiB GPU node on all of 2B
    assert max_training_pieces(1) == 1


def test_decoding_any_ids_never_fails(tok):
    """Sampled ids can split a UTF-8 character across byte tokens: decode must still return text."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        text = tok.decode(rng.integers(0, tok.vocab_size, size=rng.integers(1, 40)).tolist())
        assert isinstance(text, str)
    assert tok.decode([tok.sp.piece_to_id("<0xE2>")]) == "\ufffd"  # half a character
