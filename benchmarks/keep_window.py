"""Keep a GPU window's files: copy what benchmarks/gpu_session.sh wrote to $OUT (and the device tool
brought back) into benchmarks/results/<device>_<date>/, the folder the README quotes from, and draw
the plots the window left out (ops.py and varlen.py PNGs, from their JSON).

    python benchmarks/keep_window.py /path/the/files/came/back/to

The device and the date are read from the benchmarks' JSON (`environment.device`, `environment.date`);
a window that wrote no JSON is named from session.log's first line date and "unknown-device". An
existing folder of the same name is not overwritten: the files go to <name>-2, -3, ... instead, so
two windows on one day keep both.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
from pathlib import Path

from _timing import file_slug

RESULTS = Path(__file__).resolve().parent / "results"


def window_name(folder: Path) -> str:
    """<device slug>_<YYYY-MM-DD> from the first benchmark JSON that records its environment."""
    for path in sorted(folder.glob("*.json")):
        try:
            environment = json.loads(path.read_text()).get("environment") or {}
        except (OSError, ValueError):
            continue
        if environment.get("device") and environment.get("date"):
            return f"{file_slug(environment['device'])}_{environment['date'][:10]}"
    log = folder / "session.log"
    date = re.search(r"\d{4}-\d{2}-\d{2}", log.read_text()) if log.is_file() else None
    return f"unknown-device_{date.group(0) if date else 'undated'}"


def keep(folder: Path, results: Path = RESULTS) -> Path:
    files = [path for path in sorted(folder.iterdir()) if path.is_file() and not path.name.endswith(".partial")]
    if not files:
        raise SystemExit(f"keep_window.py: no files in {folder}")
    name = window_name(folder)
    target, number = results / name, 1
    while target.exists():
        number += 1
        target = results / f"{name}-{number}"
    target.mkdir(parents=True)
    for path in files:
        shutil.copy2(path, target / path.name)
    draw_missing_plots(target)
    return target


def draw_missing_plots(folder: Path) -> None:
    """The PNGs the window left out to stay within the device tool's 8 files (ops.py --no-plot, varlen.py
    without --plot), drawn here from their JSON."""
    for pattern, script in (("ops_*.json", "ops"), ("varlen_*.json", "varlen")):
        for json_path in sorted(folder.glob(pattern)):
            if json_path.with_suffix(".png").exists():
                continue
            try:
                module = importlib.import_module(script)
                print(f"drew {module.plot_json(json_path)}")
            except Exception as err:  # a plot is a convenience: the JSON is what is kept
                print(f"keep_window.py: no plot for {json_path.name} ({type(err).__name__}: {err})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the folder holding the window's files")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"argument folder: not a folder: {args.folder}")
    target = keep(args.folder)
    print(f"kept {len(list(target.iterdir()))} files in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
