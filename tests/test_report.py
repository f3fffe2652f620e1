"""The report card: sections, the final BASE | MID | SFT | RL table read from the stages' figures,
training curves as PNGs linked from report.md, and the header's environment and code size."""
import json
import re

import numpy as np
import pytest

from nanochat_jax import report


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def table_rows(text: str) -> dict[str, list[str]]:
    """{metric: [BASE, MID, SFT, RL] cells} of the report's summary table."""
    header = text.index("| Metric | BASE | MID | SFT | RL |")
    rows = {}
    for line in text[header:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_final_table_reads_each_stage_and_leaves_missing_cells_empty(base_dir):
    report.log("Base model evaluation", {"CORE": 0.2219, "tasks_evaluated": 18})
    report.log("Chat evaluation mid", {"ARC-Easy": 0.3561, "MMLU": 0.3111, "ChatCORE": 0.073})
    report.log("Chat evaluation sft", {"ARC-Easy": np.float32(0.5), "GSM8K": 0.0455, "SpellingBee": 0.98})
    text = report.generate().read_text()
    rows = table_rows(text)
    assert list(rows) == ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee",
                          "ChatCORE"]
    assert rows["CORE"] == ["0.2219", "", "", ""]
    assert rows["ARC-Easy"] == ["", "0.3561", "0.5000", ""]
    assert rows["MMLU"] == ["", "0.3111", "", ""]
    assert rows["GSM8K"] == ["", "", "0.0455", ""]
    assert rows["SpellingBee"] == ["", "", "0.9800", ""]
    assert rows["ChatCORE"] == ["", "0.0730", "", ""]
    assert rows["HumanEval"] == ["", "", "", ""] and rows["ARC-Challenge"] == ["", "", "", ""]
    # the sections themselves are there, in pipeline order
    assert text.index("## Base model evaluation") < text.index("## Chat evaluation mid") < text.index(
        "## Chat evaluation sft")


def test_rerunning_a_stage_replaces_its_figures(base_dir):
    report.log("Base model evaluation", {"CORE": 0.1})
    report.log("Base model evaluation", {"CORE": 0.2})
    assert table_rows(report.generate().read_text())["CORE"][0] == "0.2000"


def write_metrics(base_dir, stage, tag, records):
    run = base_dir / "checkpoints" / stage / tag
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_training_curves_are_pngs_linked_from_the_report(base_dir, tmp_path):
    records = [{"step": s, "loss": 5.0 / s, **({"val_bpb": 3.0 / s} if s % 5 == 0 else {})} for s in range(1, 21)]
    write_metrics(base_dir, "base", "tiny", records + [{"step": 20, "loss": 0.1}])  # a resumed run's repeat
    write_metrics(base_dir, "sft", "tiny", records[:3])
    work = tmp_path / "work"
    work.mkdir()
    text = report.generate(copy_to=work).read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["base-curves.png", "sft-curves.png"]  # mid and rl never trained: no picture
    for name in links:
        for folder in (base_dir / "report", work):
            png = (folder / name).read_bytes()
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    from PIL import Image  # matplotlib's own dependency

    pixels = np.asarray(Image.open(base_dir / "report" / "base-curves.png").convert("L"))
    assert pixels.std() > 10  # drawn on, not a blank canvas


def test_no_metrics_means_no_curves_section(base_dir):
    assert "Training curves" not in report.generate().read_text()


def test_header_has_environment_code_size_and_wall_clock(base_dir):
    report.reset()
    report.log("Tokenizer training", {"vocab_size": 4096})
    text = report.generate().read_text()
    for needle in ("Run started:", "- git: branch", "CPUs", "- devices:", "jax ", "flax ", "- characters:",
                   "- lines:", "- files:", "- tokens (approx):", "- dependencies (declared):",
                   "Total wall clock time: 0h0m"):
        assert needle in text, needle
    files = int(re.search(r"- files: (\d+)", text).group(1))
    assert files > 20  # the package's own modules are counted
    assert int(re.search(r"- dependencies \(declared\): (\d+)", text).group(1)) >= 10


def test_reset_clears_the_previous_run(base_dir):
    report.log("Chat evaluation sft", {"MMLU": 0.3})
    report.reset()
    assert table_rows(report.generate().read_text())["MMLU"] == ["", "", "", ""]
