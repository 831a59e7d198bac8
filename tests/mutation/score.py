"""Summarise the last ``mutmut run`` per clinical module (``make mutate`` prints this).

Reads ``mutmut results --all true`` (one ``name: status`` line per mutant) and prints a
Markdown table: killed, survived, timeouts, not checked, and the score = killed (timeouts
count as killed: the mutant hung the tests) / checked.  ``--fail-under P`` exits 1 when
the score over everything checked is below P percent.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

KILLED = {"killed", "timeout"}


def parse(text: str, only: list[str] | None = None) -> dict[str, collections.Counter[str]]:
    """``{module: Counter(status)}`` from mutmut's results listing (``only``: fnmatch patterns
    of the mutant names that were asked for, as given to ``mutmut run``)."""
    out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in text.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if not sep or ".x" not in name:
            continue
        if only and not any(fnmatch.fnmatch(name, p) for p in only):
            continue
        module = name.split(".x", 1)[0]
        out[module][status.strip()] += 1
    return out


def table(counts: dict[str, collections.Counter[str]]) -> tuple[str, float]:
    rows = ["| module | mutants | checked | killed | survived | timeout | other | not checked | score |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    tk = tc = 0
    for module in sorted(counts):
        c = counts[module]
        total = sum(c.values())
        unchecked = c["not checked"]
        checked = total - unchecked
        killed = c["killed"] + c["timeout"]
        other = checked - killed - c["survived"]
        tk, tc = tk + killed, tc + checked
        score = f"{100 * killed / checked:.1f} %" if checked else "-"
        rows.append(f"| {module} | {total} | {checked} | {c['killed']} | {c['survived']} | {c['timeout']} | {other} "
                    f"| {unchecked} | {score} |")
    overall = 100 * tk / tc if tc else 0.0
    rows.append(f"| **all checked** | | {tc} | {tk} | | | | | **{overall:.1f} %** |")
    return "\n".join(rows), overall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mutmut", default=str(Path(sys.executable).with_name("mutmut")))
    ap.add_argument("--fail-under", type=float, default=None)
    ap.add_argument("patterns", nargs="*", help="mutant name patterns (those given to mutmut run); default all")
    args = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([args.mutmut, "results", "--all", "true"], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return 2
    text, overall = table(parse(res.stdout, args.patterns))
    print(text)
    if args.fail_under is not None and overall < args.fail_under:
        print(f"mutation score {overall:.1f} % is below {args.fail_under:g} %", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
