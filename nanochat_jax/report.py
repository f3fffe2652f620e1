"""The report card: each stage writes its figures as a section under the base directory, and
`generate` joins them into report.md with nanochat's final table and the training curves.

`log(section, data)` writes `$NANOCHAT_BASE_DIR/report/<slug>.md` (a `## section` header, a
timestamp, then `- key: value` lines: floats to 4 decimals, large ints with separators, and any
markdown given as a string) and `<slug>.json` (the figures themselves, which the final table reads,
so it never parses markdown); re-running a stage replaces its section. `reset()` starts a run's
report with a header (time, code version, machine, library versions, code size). `generate()` joins
the header and the sections in pipeline order, adds the final table (BASE | MID | SFT | RL), the
loss and validation bits-per-byte curves of each trained stage as PNGs beside report.md, and the
total wall-clock time.
"""
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from nanochat_jax import paths

STAGES = ("base", "mid", "sft", "rl")
SECTION_ORDER = (
    "tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-loss",
    "base-model-evaluation", "midtraining", "chat-evaluation-mid", "chat-sft", "chat-evaluation-sft",
    "chat-rl", "chat-evaluation-rl",
)
HEADER = "header.md"
# Final table rows, in nanochat's order (CORE first, ChatCORE last); each is read from the
# figures of a stage's base evaluation (CORE) or chat evaluation (the rest).
TABLE_ROWS = ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def report_dir():
    path = paths.base_dir() / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def format_value(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def log(section: str, *items) -> None:
    """Write a stage's section; each item is a dict of figures or a markdown string."""
    lines = [f"## {section}", f"timestamp: {datetime.datetime.now():{TIME_FORMAT}}", ""]
    figures = {}
    for item in items:
        if isinstance(item, dict):
            lines += [f"- {key}: {format_value(value)}" for key, value in item.items()]
            figures.update(item)
        else:
            lines.append(str(item).rstrip())
        lines.append("")
    name = slug(section)
    _write(report_dir() / f"{name}.json", json.dumps(figures, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
    _write(report_dir() / f"{name}.md", "\n".join(lines))


def figures(section_slug: str) -> dict:
    """The figures a section logged, keyed by their names lower-cased without punctuation
    ("ARC-Easy" -> "arceasy"), or {} when that section has not been written."""
    path = report_dir() / f"{section_slug}.json"
    if not path.exists():
        return {}
    return {re.sub(r"[^a-z0-9]", "", key.lower()): value for key, value in json.loads(path.read_text()).items()}


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _code_files(root: Path) -> list[Path]:
    """The project's own source and docs: no virtual environments, caches or build output."""
    def ours(path: Path) -> bool:
        parts = path.relative_to(root).parts
        return not any(p.startswith(".") or p in ("build", "dist") or p.endswith(".egg-info") for p in parts)
    return sorted(p for p in root.rglob("*") if p.suffix in (".py", ".md", ".toml", ".html", ".yaml") and ours(p))


def bloat(root: Path) -> dict:
    """Code size as nanochat's report counts it (tokens ~ characters / 4), and the dependencies:
    those the package declares, and every distribution installed beside it (its closure)."""
    text = [p.read_text(errors="replace") for p in _code_files(root)]
    chars = sum(map(len, text))
    try:
        declared = [r for r in importlib.metadata.requires("nanochat-jax") or [] if "extra ==" not in r]
    except importlib.metadata.PackageNotFoundError:
        declared = []
    return {"characters": chars, "lines": sum(t.count("\n") for t in text), "files": len(text),
            "tokens (approx)": chars // 4, "dependencies (declared)": len(declared),
            "packages installed": len(list(importlib.metadata.distributions()))}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> list[str]:
    import jax  # here, not at import: stages that only log figures need not start a backend

    devices = jax.devices()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    return [
        f"- git: branch {_git('rev-parse', '--abbrev-ref', 'HEAD') or 'unknown'}, commit {commit}"
        f"{' (dirty)' if _git('status', '--porcelain') else ''}: {_git('log', '-1', '--format=%s')[:80]}",
        f"- platform: {platform.platform()}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM",
        f"- devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
        f"{jax.process_count()} process(es)",
        f"- python {platform.python_version()}, jax {jax.__version__}, flax {_version('flax')}, "
        f"optax {_version('optax')}, orbax-checkpoint {_version('orbax-checkpoint')}, grain {_version('grain')}",
    ]


def reset() -> None:
    """Start a new report: remove old sections and pictures, write the header."""
    for path in report_dir().iterdir():
        if path.suffix in (".md", ".json", ".png"):
            path.unlink()
    lines = ["# nanochat-jax training report", "",
             f"Run started: {datetime.datetime.now():{TIME_FORMAT}}", "",
             "## Environment", "", *environment(), "", "## Bloat", ""]
    lines += [f"- {key}: {format_value(value)}" for key, value in bloat(Path(__file__).parent.parent).items()]
    _write(report_dir() / HEADER, "\n".join(lines) + "\n")


def final_table() -> str:
    """nanochat's summary table, one column per stage; a cell is empty where its stage has not run."""
    def cell(stage: str, row: str):
        source = "base-model-evaluation" + ("" if stage == "base" else f"-{stage}") if row == "CORE" \
            else f"chat-evaluation-{stage}"
        value = figures(source).get(re.sub(r"[^a-z0-9]", "", row.lower()))
        return "" if value is None else format_value(value)

    lines = ["| Metric | " + " | ".join(s.upper() for s in STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cell(stage, row) for stage in STAGES) + " |" for row in TABLE_ROWS]
    return "\n".join(lines)


def read_metrics(path: Path) -> list[dict]:
    """A run's metrics.jsonl; after a resume a step may appear twice, and the later line wins."""
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        by_step[record.get("step")] = record
    return [by_step[s] for s in sorted(k for k in by_step if k is not None)]


def _metrics_file(stage: str, tag: str | None) -> Path | None:
    """metrics.jsonl of the stage's run `tag`, or of its most recently written run."""
    runs = paths.base_dir() / "checkpoints" / stage
    found = [p for p in runs.glob("*/metrics.jsonl") if tag is None or p.parent.name == tag]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def plot_curves(stage: str, records: list[dict], out: Path) -> None:
    """Training loss and validation bits per byte against the step, side by side, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "loss", "training loss (EMA)"), (axes[1], "val_bpb", "validation bits per byte")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{stage}: {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def training_curves(tag: str | None = None) -> str:
    """Plot each trained stage's curves beside report.md; the markdown that links them ('' if none)."""
    links = []
    for stage in STAGES:
        path = _metrics_file(stage, tag)
        records = read_metrics(path) if path else []
        if not records:
            continue
        name = f"{stage}-curves.png"
        plot_curves(stage, records, report_dir() / name)
        links.append(f"![{stage} training curves]({name})")
    return "## Training curves\n\n" + "\n\n".join(links) + "\n" if links else ""


def generate(copy_to: Path | None = None, tag: str | None = None) -> Path:
    """Join the header and every stage's section, in pipeline order, into report.md, followed by
    the final table, the training curves (of run `tag`, default the newest of each stage) and the
    total wall-clock time. With `copy_to`, report.md and its pictures are copied there too."""
    directory = report_dir()
    parts = [(directory / HEADER).read_text()] if (directory / HEADER).exists() else []
    known = [directory / f"{name}.md" for name in SECTION_ORDER]
    extra = sorted(p for p in directory.glob("*.md") if p not in known and p.name not in (HEADER, "report.md"))
    parts += [p.read_text() for p in known + extra if p.exists()]
    started = re.search(r"Run started: (.+)", parts[0]) if parts else None
    stamps = re.findall(r"^timestamp: (.+)$", "\n".join(parts), flags=re.M)
    parts.append("## Summary\n\n" + final_table() + "\n")
    curves = training_curves(tag)
    if curves:
        parts.append(curves)
    if started and stamps:
        elapsed = (datetime.datetime.strptime(max(stamps), TIME_FORMAT)
                   - datetime.datetime.strptime(started.group(1), TIME_FORMAT))
        minutes = int(elapsed.total_seconds() // 60)
        parts.append(f"Total wall clock time: {minutes // 60}h{minutes % 60}m\n")
    out = directory / "report.md"
    _write(out, "\n".join(parts))
    if copy_to is not None:
        for path in [out, *directory.glob("*.png")]:
            shutil.copyfile(path, Path(copy_to) / path.name)
    return out
