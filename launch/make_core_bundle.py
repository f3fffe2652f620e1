"""Rebuild the CORE subset packaged with the library (nanochat_jax/evals/core_bundle) from a bundle.

    python -m launch.make_core_bundle --src ../shared/eval_bundle

For every task of the source's core.yaml whose file is present, stores nanochat's evaluation list
cropped at --crop: the items shuffled with Random(1337), the first --crop kept, as gzipped JSON
lines (mtime 0, so the bytes are reproducible). Its core.yaml lists those tasks with
`shuffled_crop: <crop>`, which tells the loader not to shuffle again: for any max_per_task up to
the crop, the first max_per_task items are exactly nanochat's crop of the full task.
"""
import argparse
import gzip
import json
import shutil
from pathlib import Path

import yaml

from nanochat_jax.evals.bundle import PACKAGED_DIR, load_bundle


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="an unpacked eval bundle (core.yaml, eval_meta_data.csv, eval_data/)")
    parser.add_argument("--out", default=str(PACKAGED_DIR))
    parser.add_argument("--crop", type=int, default=500)
    args = parser.parse_args(argv)
    source, out = load_bundle(args.src), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    entries, sizes = [], {}
    for task in source.tasks:
        items = source.items(task, args.crop)
        if items is None:
            print(f"{task.label}: missing in {args.src}, left out", flush=True)
            continue
        uri = f"{task.dataset_uri}.gz"
        path = out / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        path.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
        entry = {"label": task.label, "dataset_uri": uri, "num_fewshot": [task.num_fewshot],
                 "icl_task_type": task.task_type}
        if task.delimiter != " ":
            entry["continuation_delimiter"] = task.delimiter
        entries.append(entry)
        sizes[task.label] = len(items)
        print(f"{task.label}: {len(items)} items, {path.stat().st_size:,} bytes", flush=True)
    header = (f"# CORE subset packaged with nanochat_jax: per task, nanochat's Random(1337) shuffle cropped at "
              f"{args.crop}.\n# Made by `python -m launch.make_core_bundle`; do not edit by hand.\n")
    body = yaml.safe_dump({"shuffled_crop": args.crop, "icl_tasks": entries}, sort_keys=False, allow_unicode=True,
                          default_flow_style=None)
    (out / "core.yaml").write_text(header + body)
    shutil.copyfile(Path(args.src) / "eval_meta_data.csv", out / "eval_meta_data.csv")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"tasks": len(entries), "items": sum(sizes.values()), "bytes": total, "out": str(out)}))


if __name__ == "__main__":
    main()
