"""The report card: each stage writes its figures as a markdown section under the base directory.

`log(section, data)` writes `$NANOCHAT_BASE_DIR/report/<slug>.md`: a `## section` header, a
timestamp, then `- key: value` lines (floats to 4 decimals, large ints with separators) and any
markdown given as a string, so re-running a stage replaces its section. `reset()` starts a run's
report with a header (code version, machine, start time, code size) and `generate()` joins the
header and the sections in pipeline order into report.md, with the total wall-clock time.
"""
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import jax

from nanochat_jax import paths


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


def log(section: str, *items) -> None:
    """Write a stage's section; each item is a dict of figures or a markdown string."""
    lines = [f"## {section}", f"timestamp: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
    for item in items:
        if isinstance(item, dict):
            lines += [f"- {key}: {format_value(value)}" for key, value in item.items()]
        else:
            lines.append(str(item).rstrip())
        lines.append("")
    path = report_dir() / f"{slug(section)}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


SECTION_ORDER = (
    "tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-loss",
    "base-model-evaluation", "midtraining", "chat-evaluation-mid", "chat-sft", "chat-evaluation-sft",
    "chat-rl", "chat-evaluation-rl",
)
HEADER = "header.md"


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _bloat(root: Path) -> dict:
    files = [p for p in root.rglob("*") if p.suffix in (".py", ".md", ".toml", ".html")
             and ".venv" not in p.parts and ".git" not in p.parts]
    text = [p.read_text(errors="replace") for p in files]
    chars = sum(map(len, text))
    return {"characters": chars, "lines": sum(t.count("\n") for t in text), "files": len(files),
            "tokens (approx)": chars // 4}


def reset() -> None:
    """Start a new report: remove old sections and write the header (machine, code, start time)."""
    for path in report_dir().glob("*.md"):
        path.unlink()
    devices = jax.devices()
    lines = [
        "# nanochat-jax training report", "",
        f"Run started: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", "",
        "## Environment", "",
        f"- git commit: {_git('rev-parse', '--short', 'HEAD') or 'unknown'}"
        f"{' (dirty)' if _git('status', '--porcelain') else ''}",
        f"- platform: {platform.platform()}, {os.cpu_count()} CPUs",
        f"- devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()})",
        f"- python {platform.python_version()}, jax {jax.__version__}", "",
        "## Bloat", "",
    ]
    lines += [f"- {key}: {format_value(value)}" for key, value in _bloat(Path(__file__).parent.parent).items()]
    (report_dir() / HEADER).write_text("\n".join(lines) + "\n")


def generate(copy_to: Path | None = None) -> Path:
    """Join the header and every stage's section, in pipeline order, into report.md."""
    directory = report_dir()
    parts = [(directory / HEADER).read_text()] if (directory / HEADER).exists() else []
    known = [directory / f"{name}.md" for name in SECTION_ORDER]
    extra = sorted(p for p in directory.glob("*.md") if p not in known and p.name not in (HEADER, "report.md"))
    parts += [p.read_text() for p in known + extra if p.exists()]
    started = re.search(r"Run started: (.+)", parts[0]) if parts else None
    stamps = re.findall(r"^timestamp: (.+)$", "\n".join(parts), flags=re.M)
    if started and stamps:
        fmt = "%Y-%m-%d %H:%M:%S"
        elapsed = datetime.datetime.strptime(max(stamps), fmt) - datetime.datetime.strptime(started.group(1), fmt)
        minutes = int(elapsed.total_seconds() // 60)
        parts.append(f"Total wall clock time: {minutes // 60}h{minutes % 60}m\n")
    out = directory / "report.md"
    out.write_text("\n".join(parts))
    if copy_to is not None:
        (Path(copy_to) / "report.md").write_text(out.read_text())
    return out
