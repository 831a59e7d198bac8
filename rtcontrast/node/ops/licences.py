"""Licences of the installed dependency closure: the project is Apache-2.0 and ships no GPL code.

Why: a release bundles its Python environment (scripts/install.sh), so every distribution
a default install pulls in is redistributed with it.  A GPL dependency (pylibjpeg-libjpeg
was one) would put the whole release under the GPL.  This walks the closure of the
``[project] dependencies`` in pyproject.toml through ``importlib.metadata`` (markers
evaluated, extras not followed unless asked) and reads each distribution's declared
licence (License-Expression, License, classifiers).

    python -m rtcontrast.licences [--extra NAME ...]    # table; exit 1 on GPL/AGPL
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

__all__ = ["DistLicence", "dependency_closure", "declared_requirements", "is_strong_copyleft", "main"]

_PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"  # rtcontrast/node/ops/ -> the checkout
# GPL and AGPL (any version) are strong copyleft; LGPL ("Lesser"/"Library") is not matched.
_GPL_RE = re.compile(r"(?<![L\w])A?GPL|GNU (Affero )?General Public License", re.IGNORECASE)
_LGPL_RE = re.compile(r"LGPL|Lesser General Public|Library General Public", re.IGNORECASE)


@dataclass(frozen=True)
class DistLicence:
    """One installed distribution of the closure and what it declares."""

    name: str
    version: str
    licence: str  # License-Expression, else the first line of License, else the classifiers
    required_by: str


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _licence_text(dist: Distribution) -> str:
    meta = dist.metadata
    expr = meta.get("License-Expression")
    if expr:
        return expr.strip()
    classifiers = [c.split("::")[-1].strip() for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    text = (meta.get("License") or "").strip().splitlines()
    first = text[0].strip()[:80] if text else ""
    return "; ".join(x for x in [first, *classifiers] if x) or "UNKNOWN"


def is_strong_copyleft(licence: str) -> bool:
    """True for GPL/AGPL (not LGPL): code a permissive release must not bundle by default."""
    without_lgpl = _LGPL_RE.sub("", licence)
    return bool(_GPL_RE.search(without_lgpl))


def declared_requirements(pyproject: Path = _PYPROJECT, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """``[project] dependencies`` (plus the named optional extras) of pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return [Requirement(r) for r in reqs]


def dependency_closure(requirements: list[Requirement]) -> tuple[list[DistLicence], list[str]]:
    """(installed distributions reached from ``requirements``, requirement names not installed)."""
    seen: dict[str, DistLicence] = {}
    missing: list[str] = []
    todo = [(r, "pyproject.toml") for r in requirements]
    while todo:
        req, parent = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = _norm(req.name)
        if key in seen or key in missing:
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            missing.append(key)
            continue
        seen[key] = DistLicence(dist.metadata["Name"], dist.version, _licence_text(dist), parent)
        todo.extend((Requirement(r), seen[key].name) for r in dist.requires or [])
    return sorted(seen.values(), key=lambda d: d.name.lower()), sorted(missing)


def main(argv: list[str] | None = None) -> int:
    """Print the closure's licences; exit 1 when a GPL/AGPL distribution is in it."""
    ap = argparse.ArgumentParser(description="licences of rtcontrast's installed dependency closure")
    ap.add_argument("--extra", action="append", default=[], help="also follow this optional extra of pyproject.toml")
    ap.add_argument("--pyproject", type=Path, default=_PYPROJECT)
    a = ap.parse_args(argv)
    dists, missing = dependency_closure(declared_requirements(a.pyproject, tuple(a.extra)))
    bad = [d for d in dists if is_strong_copyleft(d.licence)]
    for d in dists:
        flag = "GPL! " if d in bad else "     "
        print(f"{flag}{d.name} {d.version}: {d.licence} (required by {d.required_by})")
    for m in missing:
        print(f"     {m}: not installed")
    if bad:
        print(f"{len(bad)} GPL-licensed distribution(s) in the closure: "
              f"{', '.join(d.name for d in bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
