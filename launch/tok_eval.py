"""Compare our tokenizer's compression (bytes per token) with GPT-2's and GPT-4's, as nanochat does.

    python -m launch.tok_eval --config=tiny
    python -m launch.tok_eval --config=d20 --tiktoken-dir=/data/tiktoken    # baselines offline

Texts: nanochat's five samples (news, korean, code, math, science) and the first row group of the
first train shard (`fwe-train`) and of the val shard (`fwe-val`), documents joined by newlines.
Baselines are tiktoken's `r50k_base` (GPT-2's ranks) and `cl100k_base` (GPT-4). Offline, point
`--tiktoken-dir` (default $NANOCHAT_TIKTOKEN_DIR) at a folder holding `r50k_base.tiktoken` and
`cl100k_base.tiktoken`; without it tiktoken downloads them. A baseline that cannot be loaded is
reported and its figures are null. Prints both comparison tables, writes them to the report, and
ends with one JSON line: {"bytes_per_token": {"ours"|"gpt2"|"gpt4": {text: value}},
"vocab_size": ours, "vocab_sizes", "tokens", "bytes", "token_savings_pct", "config"}.
"""
import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from launch import run
from launch.tok_eval_samples import SAMPLES
from nanochat_jax import paths, report
from nanochat_jax.config import config_from_args
from nanochat_jax.data.shards import shards_for_split
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.tokenizer_tiktoken import load_tiktoken

BASELINES = {"gpt2": ("GPT-2", "r50k_base"), "gpt4": ("GPT-4", "cl100k_base")}


def first_row_group_text(shard: Path) -> str:
    """A shard's first row group, documents joined by newlines (nanochat's fwe-train/fwe-val)."""
    column = pq.ParquetFile(shard).read_row_group(0, columns=["text"]).column("text")
    return "\n".join(column.to_pylist())


def evaluation_texts(data_cfg) -> dict[str, str]:
    train = shards_for_split(data_cfg, "train")
    if not train:
        raise SystemExit(f"no train shards besides the val shard {data_cfg.val_shard}")
    return {**SAMPLES, "fwe-train": first_row_group_text(train[0]),
            "fwe-val": first_row_group_text(shards_for_split(data_cfg, "val")[0])}


def measure(encode, decode, texts: dict[str, str], name: str) -> dict[str, dict]:
    """Bytes, tokens and bytes per token of each text, once it is shown to decode back exactly."""
    results = {}
    for text_name, text in texts.items():
        ids = encode(text)
        decoded = decode(ids)
        if decoded != text:
            at = len(os.path.commonprefix([decoded, text]))
            raise RuntimeError(f"{name} tokenizer does not round-trip the {text_name!r} text "
                               f"(first difference at character {at})")
        n_bytes = len(text.encode("utf-8"))
        results[text_name] = {"bytes": n_bytes, "tokens": len(ids), "ratio": n_bytes / len(ids)}
    return results


def token_savings(baseline: dict | None, ours: dict) -> dict[str, float | None]:
    """Per text, percent fewer tokens than the baseline needs (negative: ours needs more)."""
    return {name: None if baseline is None else
            100 * (baseline[name]["tokens"] - o["tokens"]) / baseline[name]["tokens"]
            for name, o in ours.items()}


def rounded(values: dict, digits: int) -> dict:
    return {name: None if v is None else round(v, digits) for name, v in values.items()}


def comparison_table(label: str, baseline: dict | None, ours: dict) -> str:
    """nanochat's markdown comparison of one baseline with ours; n/a where the baseline is missing."""
    lines = [f"### Comparison with {label}", "",
             f"| Text Type | Bytes | {label} Tokens | {label} Ratio | Ours Tokens | Ours Ratio | Relative Diff % |",
             "|-----------|-------|--------------|--------------|-------------|------------|-----------------|"]
    for name, diff in token_savings(baseline, ours).items():
        o = ours[name]
        b = f"{baseline[name]['tokens']} | {baseline[name]['ratio']:.2f}" if baseline else "n/a | n/a"
        d = "n/a" if diff is None else f"{diff:+.1f}%"
        lines.append(f"| {name} | {o['bytes']} | {b} | {o['tokens']} | {o['ratio']:.2f} | {d} |")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--tiktoken-dir", default=os.environ.get("NANOCHAT_TIKTOKEN_DIR") or None,
                        help="folder with r50k_base.tiktoken and cl100k_base.tiktoken, for offline baselines "
                             "(default: $NANOCHAT_TIKTOKEN_DIR; none: tiktoken downloads them)")


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    try:
        ours = Tokenizer.load(paths.tokenizer_dir())
    except FileNotFoundError:
        raise SystemExit(f"no tokenizer in {paths.tokenizer_dir()}: train one first with "
                         f"`python -m launch.tok_train --config={cfg.name}`") from None
    texts = evaluation_texts(cfg.data)
    results = {"ours": measure(ours.encode, ours.decode, texts, "our")}
    vocab_sizes = {"ours": ours.vocab_size}
    for key, (label, encoding) in BASELINES.items():
        try:
            enc = load_tiktoken(encoding, args.tiktoken_dir)
        except Exception as err:  # network, missing file, hash mismatch: evaluate ours regardless
            print(f"{label} baseline unavailable ({type(err).__name__}: {err}); its figures are null. "
                  f"Offline, pass --tiktoken-dir (or set NANOCHAT_TIKTOKEN_DIR) to a folder holding "
                  f"{encoding}.tiktoken.", flush=True)
            results[key], vocab_sizes[key] = None, None
            continue
        results[key] = measure(enc.encode_ordinary, enc.decode, texts, label)
        vocab_sizes[key] = enc.n_vocab

    print("vocab sizes: " + ", ".join(f"{k} {'n/a' if v is None else f'{v:,}'}" for k, v in vocab_sizes.items()))
    tables = [comparison_table(label, results[key], results["ours"]) for key, (label, _) in BASELINES.items()]
    print("\n\n".join(tables), flush=True)
    report.log("Tokenizer evaluation", {f"{k}_vocab_size": v for k, v in vocab_sizes.items()}, *tables)

    def per_text(key, field):
        return {name: None if results[key] is None else results[key][name][field] for name in texts}

    result = {
        "config": cfg.name,
        "bytes_per_token": {k: rounded(per_text(k, "ratio"), 4) for k in results},
        "vocab_size": ours.vocab_size,
        "vocab_sizes": vocab_sizes,
        "tokens": {k: per_text(k, "tokens") for k in results},
        "bytes": per_text("ours", "bytes"),
        "token_savings_pct": {k: rounded(token_savings(results[k], results["ours"]), 2) for k in BASELINES},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
