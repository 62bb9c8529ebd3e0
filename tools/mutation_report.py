"""The table of docs/MUTATION.md from mutmut's verdicts and the report's explanations, and the survivors it leaves
unexplained.

    python tools/mutation_report.py [--doc docs/MUTATION.md]     run where `make mutants` ran (mutmut's mutants/)

A surviving mutant counts as *equivalent*, *needs CUDA/DDP* or *spec allows* when the report's section of that name
lists it: a bullet under the file's `vision_mamba/<file>.py:` line that names the function in backticks first (`func`
or `Class.method`; a method may be named alone) and ends with the mutant numbers in parentheses, e.g. `(3, 5)`.
Every other survivor is printed, one per line, and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

SECTIONS = {"## Equivalent mutants": "equivalent", "## Survivors that need CUDA or several processes": "needs CUDA/DDP",
            "## Survivors the specification allows": "spec allows"}
STATUSES = {"killed": "killed", "timeout": "timeout", "no tests": "no tests", "not checked": "not run",
            "survived": "survived", "suspicious": "timeout", "segfault": "crashed", "skipped": "not run"}
COLUMNS = ["killed", "equivalent", "needs CUDA/DDP", "spec allows", "survived", "timeout", "crashed", "no tests",
           "not run"]
MUTANT = re.compile(r"^(?P<module>[\w.]+)\.x(?:ǁ(?P<cls>\w+)ǁ|_)(?P<func>\w+?)__mutmut_(?P<n>\d+)$")


def verdicts() -> list[tuple[str, str, str, int, str]]:
    """(file, qualified function, method or function name, number, status) of every mutant."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True,
                         text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        m = MUTANT.match(name)
        if not m:
            continue
        file = m["module"].replace(".", "/") + ".py"
        qualname = f"{m['cls']}.{m['func']}" if m["cls"] else m["func"]
        rows.append((file, qualname, m["func"], int(m["n"]), STATUSES[status]))
    return rows


def explained(doc: Path) -> dict[tuple[str, str, int], str]:
    """(file, function as written, number) -> the section's column, from the report's bullets."""
    found: dict[tuple[str, str, int], str] = {}
    column = file = None
    bullet = ""

    def close() -> None:
        if column and file and bullet:
            name = re.match(r"- `([\w.]+)`", bullet)
            numbers = re.search(r"\(([\d, ]+)\)\s*$", bullet)
            if not (name and numbers):
                raise SystemExit(f"error: {doc}: a bullet without `function` first or (numbers) last: {bullet[:80]}")
            for n in numbers[1].split(","):
                found[(file, name[1], int(n))] = column
    for line in doc.read_text().splitlines() + ["## end"]:
        if line.startswith(("- ", "## ")) or re.match(r"^vision_mamba/\S+\.py:$", line):
            close()
            bullet = ""
        if line.startswith("## "):
            column, file = SECTIONS.get(line.strip()), None
        elif re.match(r"^vision_mamba/\S+\.py:$", line):
            file = line[:-1]
        elif line.startswith("- "):
            bullet = line
        elif bullet and line.startswith("  "):
            bullet += " " + line.strip()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "MUTATION.md")
    args = parser.parse_args(argv)
    notes = explained(args.doc)
    counts: dict[str, Counter] = defaultdict(Counter)
    unexplained, used = [], set()
    for file, qualname, func, n, status in verdicts():
        if status == "survived":
            key = next((k for k in ((file, qualname, n), (file, func, n)) if k in notes), None)
            if key:
                status = notes[key]
                used.add(key)
            else:
                unexplained.append(f"{file} {qualname} {n}")
        counts[file][status] += 1
    print("| file | mutants | " + " | ".join(COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    total = Counter()
    for file in sorted(counts):
        total.update(counts[file])
        print(f"| {file} | {sum(counts[file].values())} | " + " | ".join(str(counts[file][c]) for c in COLUMNS) + " |")
    print(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[c]) for c in COLUMNS) + " |")
    stale = sorted(set(notes) - used)
    for key in stale:
        print(f"listed in the report but not a survivor now: {' '.join(map(str, key))}", file=sys.stderr)
    for line in unexplained:
        print(f"unexplained survivor: {line}", file=sys.stderr)
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
