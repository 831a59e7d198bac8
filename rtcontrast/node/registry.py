"""The model registry: which ONNX model the node runs, and what the shipped models are.

A relative model path that does not exist in the working directory is looked up in the
installation (so ``python node.py run`` finds the shipped model from anywhere); a
protocol may pin a model by name and sha256 so that a swapped file is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtcontrast.core.contract import ContractError
from rtcontrast.core.inference import QMapModel
from rtcontrast.settings.node import NodeConfig
from rtcontrast.settings.protocol import ProtocolConfig

log = logging.getLogger(__name__)

#: The installation root (the folder that holds models/ and config/).
_INSTALL_ROOT = Path(__file__).resolve().parents[2]


def resolve_model_path(path: Path) -> Path:
    """``path`` if it exists; a relative path missing here is looked up in the installation."""
    if path.exists() or path.is_absolute():
        return path
    alt = _INSTALL_ROOT / path
    return alt if alt.exists() else path


# ---------------------------------------------------------------------- model management
# Several models may sit in models/; config.model_path is the default, a protocol may pin one
# by name and sha256 (protocol.yaml ``model: {name, sha256}``).


@dataclass
class ModelEntry:
    """One models/*.onnx file with what its metadata and card say (``node.py models``)."""

    path: Path
    name: str | None
    version: str | None
    contract: str | None
    sha256: str
    card: dict[str, Any] | None
    error: str | None = None


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def list_models(models_dir: Path) -> list[ModelEntry]:
    """Every ``*.onnx`` in ``models_dir`` with its metadata, sha256 and card (``NAME.json``), by name."""
    import json

    from rtcontrast.core.inference import file_sha256

    out = []
    for path in sorted(models_dir.glob("*.onnx")):
        card = None
        card_path = path.with_suffix(".json")
        if card_path.is_file():
            try:
                card = json.loads(card_path.read_text())
            except (OSError, ValueError):
                card = None
        try:
            meta = _onnx_metadata(path)
            out.append(ModelEntry(path, meta.get("name"), meta.get("version"), meta.get("rtcontrast.contract"),
                                  file_sha256(path), card))
        except Exception as exc:  # an unreadable file is listed, not fatal
            out.append(ModelEntry(path, None, None, None, file_sha256(path), card, f"{type(exc).__name__}: {exc}"))
    return out


def check_model_pin(model: QMapModel, pin: Any) -> None:
    """Raise :class:`ContractError` when ``model`` is not the protocol's pinned one (``pin`` None: any)."""
    if pin is None:
        return
    if model.info.name != pin.name or model.sha256 != pin.sha256.lower():
        raise ContractError(
            f"protocol pins model '{pin.name}' sha256 {pin.sha256[:12]}..., but the model in use is "
            f"'{model.info.name}' {model.info.version} sha256 {model.sha256[:12]}... ({model.path}); "
            "restore the validated model or update the protocol's model pin (python node.py models lists sha256)")


def resolve_model(config: NodeConfig, protocol: ProtocolConfig) -> Path:
    """The model file to load: ``config.model_path``, or the protocol's pinned model in its folder.

    A pin is matched by metadata name among ``models/*.onnx`` (the configured file first)
    and then by file SHA-256; a missing name or a differing SHA-256 raises
    :class:`ContractError` saying which, so the node refuses to start.
    """
    default = resolve_model_path(config.model_path)
    pin = protocol.model
    if pin is None:
        return default
    entries = list_models(default.parent) if default.parent.is_dir() else []
    named = [e for e in entries if e.name == pin.name]
    if not named:
        found = ", ".join(sorted({e.name or e.path.name for e in entries})) or "none"
        raise ContractError(f"protocol pins model '{pin.name}' (sha256 {pin.sha256[:12]}...), but no model of that name "
                            f"is in {default.parent} (found: {found}); install it there or change the pin")
    match = [e for e in named if e.sha256 == pin.sha256.lower()]
    if not match:
        got = "; ".join(f"{e.path.name} {e.version} sha256 {e.sha256[:12]}..." for e in named)
        raise ContractError(f"protocol pins model '{pin.name}' sha256 {pin.sha256[:12]}..., but {got} differs: "
                            "the file is not the validated model; restore it or update the pin")
    same = [e for e in match if e.path.resolve() == default.resolve()]
    return (same or match)[0].path


