"""CORE's evaluation bundle: nanochat's `eval_bundle.zip` layout, found or fetched.

A bundle is a folder with `core.yaml` (the `icl_tasks` list), `eval_meta_data.csv` (each task's
"Random baseline", in %) and `eval_data/<category>/<task>.jsonl`. Which one is used, first match:
an explicit folder (`--bundle-dir`), `$NANOCHAT_EVAL_BUNDLE`, `$NANOCHAT_BASE_DIR/eval_bundle`
(where `download_bundle` unpacks the real one), else the subset packaged with the library.

The packaged subset (`core_bundle/`, made by `launch.make_core_bundle`) stores, per task, nanochat's
`Random(1337)` shuffle already cropped to 500 items (gzipped), and says so in its core.yaml
(`shuffled_crop: 500`): the loader does not shuffle it again, so any crop of at most 500 is
exactly nanochat's, and it refuses to pretend to have more.
"""
import csv
import dataclasses
import gzip
import json
import os
import random
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml
from tqdm import tqdm

from nanochat_jax import paths
from nanochat_jax.data.download import DownloadError, download_file

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_ENV = "NANOCHAT_EVAL_BUNDLE"
PACKAGED_DIR = Path(__file__).parent / "core_bundle"
SHUFFLE_SEED = 1337
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


class BundleError(ValueError):
    """A bundle that cannot be used as asked (malformed, or too small for the crop)."""


@dataclasses.dataclass(frozen=True)
class Task:
    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    delimiter: str


@dataclasses.dataclass(frozen=True)
class Bundle:
    root: Path
    tasks: tuple[Task, ...]
    baselines: dict[str, float]  # label -> random baseline in %
    shuffled_crop: int | None    # set when the files already hold nanochat's shuffle, cropped to this

    @property
    def name(self) -> str:
        return "packaged subset" if self.root.resolve() == PACKAGED_DIR.resolve() else str(self.root)

    def task_path(self, task: Task) -> Path:
        return self.root / "eval_data" / task.dataset_uri

    def items(self, task: Task, max_per_task: int = -1) -> list[dict] | None:
        """nanochat's evaluation list for a task: its items shuffled with Random(1337) and cropped
        to max_per_task (-1: all). None when the task's file is missing."""
        path = self.task_path(task)
        if not path.is_file():
            return None
        if self.shuffled_crop is not None and not 0 < max_per_task <= self.shuffled_crop:
            raise BundleError(f"{self.name} holds only the first {self.shuffled_crop} examples of each task "
                              f"(nanochat's shuffle), so max_per_task must be 1..{self.shuffled_crop}, got "
                              f"{max_per_task}; for more, download the full bundle (python -m launch.base_eval "
                              f"--download-bundle) or pass --bundle-dir")
        items = read_jsonl(path)
        if self.shuffled_crop is None:
            random.Random(SHUFFLE_SEED).shuffle(items)
        return items[:max_per_task] if max_per_task > 0 else items


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_bundle(root) -> Bundle:
    root = Path(root)
    try:
        spec = yaml.safe_load((root / "core.yaml").read_text())
        with open(root / "eval_meta_data.csv", newline="") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
        tasks = tuple(Task(label=t["label"], task_type=t["icl_task_type"], dataset_uri=t["dataset_uri"],
                           num_fewshot=int(t["num_fewshot"][0]), delimiter=t.get("continuation_delimiter", " "))
                      for t in spec["icl_tasks"])
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{root} is not a CORE bundle: {err.filename} is missing") from None
    except (KeyError, TypeError, ValueError, yaml.YAMLError) as err:
        raise BundleError(f"{root}: malformed core.yaml or eval_meta_data.csv ({type(err).__name__}: {err})") from None
    for task in tasks:
        if task.task_type not in TASK_TYPES:
            raise BundleError(f"{root}/core.yaml: task {task.label!r} has type {task.task_type!r}; "
                              f"CORE knows {', '.join(TASK_TYPES)}")
        if task.label not in baselines:
            raise BundleError(f"{root}/eval_meta_data.csv has no random baseline for task {task.label!r}")
    return Bundle(root, tasks, baselines, spec.get("shuffled_crop"))


def default_bundle_dir() -> Path:
    return paths.base_dir() / "eval_bundle"


def resolve_bundle(bundle_dir=None) -> Bundle:
    """The bundle to evaluate on: `bundle_dir`, else $NANOCHAT_EVAL_BUNDLE, else the downloaded one,
    else the packaged subset."""
    chosen = bundle_dir or os.environ.get(BUNDLE_ENV)
    if not chosen and (default_bundle_dir() / "core.yaml").is_file():
        chosen = default_bundle_dir()
    return load_bundle(chosen or PACKAGED_DIR)


def download_bundle(url: str = BUNDLE_URL, dest: Path | None = None, **download_kwargs) -> Path:
    """Fetch nanochat's eval_bundle.zip (resumable, atomic, retried) and unpack it as `dest`
    (default $NANOCHAT_BASE_DIR/eval_bundle); an unpacked bundle already there is kept."""
    dest = Path(dest) if dest is not None else default_bundle_dir()
    if (dest / "core.yaml").is_file():
        return dest
    archive = dest.with_name(dest.name + ".zip")
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=archive.name, file=sys.stderr) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)
        try:
            download_file(url, archive, verify=zipfile.is_zipfile, progress=progress, **download_kwargs)
        except DownloadError as err:
            if not err.offline:
                raise
            raise DownloadError(url, f"cannot download the CORE bundle from {url}: this machine looks offline. "
                                     f"Point --bundle-dir or ${BUNDLE_ENV} at an unpacked copy, or leave both "
                                     f"unset to use the subset packaged with nanochat_jax", offline=True) from err
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:  # unpacked beside dest, then renamed
        out = Path(tmp) / "unpacked"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(out)
        tops = [p for p in out.iterdir() if p.name != "__MACOSX"]
        unpacked = tops[0] if len(tops) == 1 and tops[0].is_dir() else out  # zipped as eval_bundle/...
        if not (unpacked / "core.yaml").is_file():
            raise BundleError(f"{archive} holds no core.yaml")
        unpacked.rename(dest)
    archive.unlink()
    return dest
