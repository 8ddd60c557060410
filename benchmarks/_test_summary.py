"""Summarise the JUnit XML files of the pytest runs of benchmarks/gpu_session.sh into one JSON file.

    python benchmarks/_test_summary.py OUT.json RUN_NAME=FILE.xml:EXIT_STATUS ...

For each run: exit status (124/137 = cut by the time limit), counts (passed, failed, errors,
skipped), the failed and erroring tests by name with the first line of their message, and the
15 slowest tests. Prints the failures too, so they are in the session log by name. A run whose
XML is missing (killed before pytest wrote it) is recorded as such.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def summarise(path: Path, exit_status: int) -> dict:
    run = {"exit_status": exit_status, "cut_by_time_limit": exit_status in (124, 137)}
    if not path.is_file():
        return dict(run, error=f"{path.name} was not written (pytest was stopped before it finished)")
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[tag]
                message = (child.get("message") or child.text or "").strip().splitlines()[0][:300] \
                    if (child.get("message") or child.text) else ""
                break
        cases.append({"name": name, "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    counts = {outcome: sum(c["outcome"] == outcome for c in cases) for outcome in ("passed", "failed", "errors",
                                                                                      "skipped")}
    return dict(run, counts=counts,
                failures=[{k: c[k] for k in ("name", "outcome", "message")} for c in cases
                          if c["outcome"] in ("failed", "errors")],
                slowest=[{k: c[k] for k in ("name", "seconds")} for c in sorted(cases, key=lambda c: -c["seconds"])[:15]])


def main(argv) -> int:
    out, runs = Path(argv[0]), {}
    for spec in argv[1:]:
        name, rest = spec.split("=", 1)
        xml_path, status = rest.rsplit(":", 1)
        runs[name] = summarise(Path(xml_path), int(status))
    out.write_text(json.dumps(runs, indent=1) + "\n")
    for name, run in runs.items():
        if "error" in run:
            print(f"tests [{name}]: {run['error']} (exit status {run['exit_status']})")
            continue
        cut = ", CUT BY THE TIME LIMIT" if run["cut_by_time_limit"] else ""
        print(f"tests [{name}]: {run['counts']} (exit status {run['exit_status']}{cut})")
        for failure in run["failures"]:
            print(f"  {failure['outcome'].upper():<6} {failure['name']}: {failure['message']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
