"""Deterministic UIDs for derived objects.

Why deterministic: a re-run of the same job (same source instance, same recipe, same
model version) must produce the same SeriesInstanceUID/SOPInstanceUID, so that a
re-send *replaces* the earlier objects in the TPS/PACS instead of duplicating them.
A new model version or recipe gives new UIDs, so results of different models never
collide.

Two forms:
- no site root: ``2.25.<int>`` where the integer is a name-based (version 5) UUID of the
  parts (ISO/IEC 9834-8).  pydicom's ``generate_uid(prefix=None)`` ignores its entropy
  sources (it draws a random uuid4), so the UUID is derived here.
- a site root: ``pydicom.uid.generate_uid(root, entropy_srcs=[...])`` (SHA-512 of the parts).

The example roots of pydicom and highdicom are refused: they identify those toolkits'
examples, not this node.
"""

from __future__ import annotations

import uuid

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

#: Roots that must never be used for this node's objects.
FORBIDDEN_ROOTS: tuple[str, ...] = (
    PYDICOM_ROOT_UID,  # 1.2.826.0.1.3680043.8.498.
    "1.2.826.0.1.3680043.10.511.",  # highdicom (incl. 1.2.826.0.1.3680043.10.511.3.)
)

#: Namespace of the name-based UUIDs (fixed forever: changing it changes every UID).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:rtcontrast:derived-uid")

#: Separator between parts, so ("a", "bc") and ("ab", "c") give different UIDs.
_SEP = "\x1f"


class UIDRootError(ValueError):
    """The configured UID root cannot be used; the message says why."""


def _normalise_root(root: str) -> str:
    root = root.strip()
    if not root.endswith("."):
        root += "."
    for bad in FORBIDDEN_ROOTS:
        if root.startswith(bad):
            raise UIDRootError(f"UID root {root!r} is a toolkit example root ({bad}); configure the site's own root")
    if len(root) > 54:
        raise UIDRootError(f"UID root {root!r} is longer than 54 characters (no room for a unique suffix)")
    return root


def derived_uid(root: str | None, *parts: str) -> str:
    """A UID that depends only on ``root`` and ``parts`` (same inputs, same UID).

    ``root=None`` (or empty) gives the ``2.25.<uuid-int>`` form, which needs no registration.
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part (otherwise it is not unique)")
    name = _SEP.join(str(p) for p in parts)
    if not root:
        return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
    prefix = _normalise_root(root)
    try:
        return str(generate_uid(prefix=prefix, entropy_srcs=[name]))
    except ValueError as exc:  # invalid characters in the root
        raise UIDRootError(f"UID root {root!r} is not a valid UID prefix: {exc}") from exc


def series_uid(root: str | None, source_series_uid: str, recipe_key: str, model_version: str) -> str:
    """SeriesInstanceUID of a derived series: one per (source series, recipe, model version)."""
    return derived_uid(root, "series", source_series_uid, recipe_key, model_version)


def instance_uid(
    root: str | None,
    source_sop_uid: str,
    frame_number: int | None,
    recipe_key: str,
    model_version: str,
) -> str:
    """SOPInstanceUID of one derived image: one per (source instance/frame, recipe, model version)."""
    frame = "" if frame_number is None else str(int(frame_number))
    return derived_uid(root, "instance", source_sop_uid, frame, recipe_key, model_version)
