"""launch.tok_eval: bytes per token of ours vs GPT-2/GPT-4 on nanochat's texts, offline baselines."""
import hashlib
import itertools
import json
from pathlib import Path

import pytest

from configs.tiny import get_config
from launch import tok_eval
from launch.tok_eval_samples import SAMPLES
from nanochat_jax import paths, tokenizer_tiktoken
from nanochat_jax.data.shards import iter_documents, shards_for_split
from nanochat_jax.tokenizer import split_for_training, train_tokenizer

TIKTOKEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "tiktoken"
TEXTS = {"news", "korean", "code", "math", "science", "fwe-train", "fwe-val"}


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("NANOCHAT_TIKTOKEN_DIR", raising=False)
    # set, then delete: the launcher sets TIKTOKEN_CACHE_DIR, and monkeypatch then restores its absence
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    return tmp_path


@pytest.fixture
def small_tokenizer(base_dir):
    """A 512-token BPE on the demo corpus's first 50 train documents, saved where the launcher looks."""
    docs = itertools.islice(iter_documents(shards_for_split(get_config().data, "train"), doc_cap=20_000), 50)
    tokenizer = train_tokenizer((line for doc in docs for line in split_for_training(doc)), 512)
    tokenizer.save(paths.tokenizer_dir())
    return tokenizer


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_compares_with_gpt2_and_gpt4_offline(small_tokenizer, base_dir, capsys):
    if not TIKTOKEN_DIR.is_dir():
        pytest.skip(f"no tiktoken files at {TIKTOKEN_DIR}")
    tok_eval.main(["--config=tiny", f"--tiktoken-dir={TIKTOKEN_DIR}"])
    result = last_json(capsys)

    bpt = result["bytes_per_token"]
    assert set(bpt) == {"ours", "gpt2", "gpt4"}
    assert all(set(values) == TEXTS for values in bpt.values())
    assert all(value > 0 for values in bpt.values() for value in values.values())
    assert 4 < bpt["gpt4"]["news"] < 5 and 4 < bpt["gpt2"]["news"] < 5
    assert bpt["gpt4"]["korean"] > bpt["gpt2"]["korean"]  # cl100k has many Hangul tokens, r50k few
    assert result["vocab_size"] == small_tokenizer.vocab_size == 512
    assert result["vocab_sizes"] == {"ours": 512, "gpt2": 50257, "gpt4": 100277}

    ours, gpt2 = result["tokens"]["ours"]["news"], result["tokens"]["gpt2"]["news"]
    assert result["bytes"]["news"] == len(SAMPLES["news"].encode())
    assert bpt["ours"]["news"] == pytest.approx(result["bytes"]["news"] / ours, abs=1e-4)
    assert result["token_savings_pct"]["gpt2"]["news"] == pytest.approx(100 * (gpt2 - ours) / gpt2, abs=0.01)

    cache = base_dir / "tiktoken_cache"  # tiktoken found the files under the sha1 of their URLs
    for encoding in ("r50k_base", "cl100k_base"):
        assert (cache / hashlib.sha1(tokenizer_tiktoken.TIKTOKEN_URL.format(encoding).encode()).hexdigest()).is_file()

    section = (base_dir / "report" / "tokenizer-evaluation.md").read_text()
    assert "### Comparison with GPT-2" in section and "### Comparison with GPT-4" in section
    assert "| fwe-val |" in section


def test_missing_baseline_files_leave_nulls(small_tokenizer, tmp_path, capsys):
    empty = tmp_path / "no_tiktoken_files"
    empty.mkdir()
    tok_eval.main(["--config=tiny", f"--tiktoken-dir={empty}"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert "GPT-2 baseline unavailable" in out and "GPT-4 baseline unavailable" in out
    assert all(value > 0 for value in result["bytes_per_token"]["ours"].values())
    for key in ("gpt2", "gpt4"):
        assert result["bytes_per_token"][key] == dict.fromkeys(TEXTS)
        assert result["vocab_sizes"][key] is None


def test_missing_tokenizer_says_how_to_train_one(base_dir):
    with pytest.raises(SystemExit, match=r"launch\.tok_train --config=tiny"):
        tok_eval.main(["--config=tiny"])
