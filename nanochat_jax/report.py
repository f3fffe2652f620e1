"""The report card: each stage writes its figures as a markdown section under the base directory.

`log(section, data)` writes `$NANOCHAT_BASE_DIR/report/<slug>.md`: a `## section` header, a
timestamp, then `- key: value` lines (floats to 4 decimals, large ints with separators) and any
markdown given as a string, so re-running a stage replaces its section.
"""
import datetime
import re

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
