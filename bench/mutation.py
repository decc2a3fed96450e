"""Mutation testing of the pure-Python core with mutmut: how many planted bugs the fast tests catch, per module.

    python bench/mutation.py                 # from the project root, with the venv active (`make mutation`)
    python bench/mutation.py --report-only   # the table of the last run (mutants/ is kept)

The modules and the tests each mutant runs are in pyproject.toml ([tool.mutmut]). mutmut copies src/ and
tests/ into mutants/ (git-ignored), plants one change per mutant (`<` -> `<=`, `+` -> `-`, a constant,
a string, a dropped argument...), and runs the tests that call the mutated function; a mutant is killed
when a test fails (or it times out). Every run starts from a clean mutants/, so the numbers are never
stale. Prints a Markdown table module -> killed/total/% and the survivors (`mutmut show NAME` shows
one), writes bench/results/mutation.json, and exits 1 when a module is under --min (80%).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILLED = {1, 3, 24, -24, 152, 255, 36}  # a failing test, pytest's internal error, or a timeout (mutmut's codes)
NOT_RUN = {None, 33, 5}  # not checked / no test calls the function


def modules() -> list[str]:
    """The mutated files, as pyproject.toml lists them."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]


def run_mutmut(max_children: int) -> float:
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    env = dict(os.environ)
    # The tests run from mutants/, so ../shared (the real data) must be named explicitly.
    env.setdefault("CHESTXRAY_SHARED", str(ROOT.parent / "shared"))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    mutmut = Path(sys.executable).with_name("mutmut")
    start = time.perf_counter()
    subprocess.run([str(mutmut), "run", "--max-children", str(max_children)], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def collect() -> tuple[list[dict], list[str]]:
    rows, survivors = [], []
    for module in modules():
        meta = ROOT / "mutants" / (module + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        killed = sum(code in KILLED for code in codes.values())
        no_tests = sum(code in NOT_RUN for code in codes.values())
        total = len(codes)
        rows.append({"module": module.removeprefix("src/"), "killed": killed, "total": total,
                     "survived": total - killed - no_tests, "no_tests": no_tests,
                     "percent": round(100 * killed / total, 1) if total else 100.0})
        survivors += sorted(name for name, code in codes.items() if code not in KILLED)
    return rows, survivors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--min", type=float, default=80.0, help="lowest acceptable kill rate per module (%%)")
    parser.add_argument("--report-only", action="store_true", help="report the last run, run nothing")
    args = parser.parse_args()

    seconds = None if args.report_only else run_mutmut(args.max_children)
    rows, survivors = collect()
    print("\n| module | killed / total | kill rate | survived | no test |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['module']} | {r['killed']} / {r['total']} | {r['percent']:.1f}% | {r['survived']} | {r['no_tests']} |")
    killed, total = sum(r["killed"] for r in rows), sum(r["total"] for r in rows)
    print(f"| **all** | {killed} / {total} | {100 * killed / max(total, 1):.1f}% | | |")
    if seconds is not None:
        print(f"\nmutmut run took {seconds:.0f} s")
    if survivors:
        print("\nnot killed (see one with `mutmut show NAME`):\n  " + "\n  ".join(survivors))
    out = ROOT / "bench" / "results" / "mutation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seconds": seconds, "modules": rows, "not_killed": survivors}, indent=2) + "\n")
    low = [r["module"] for r in rows if r["percent"] < args.min]
    if low:
        print(f"\nunder {args.min:g}% killed: {', '.join(low)}")
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
