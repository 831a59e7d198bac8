"""An empty or non-mapping protocol file is an error (#15 finding 3), in check-config and on reload.

Before: the protocol truncated to 0 bytes + SIGHUP -> "protocol reloaded" with the embedded
default (folder ./var/export), and check-config said OK.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rtcontrast.node.admin import check_config
from rtcontrast.settings.node import ConfigError
from rtcontrast.settings.protocol import load_protocol
from tests.support import LENIENT_QA


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "{}\n", "- a\n- list\n", "just a string\n"])
def test_empty_or_non_mapping_protocol_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "protocol.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_protocol(path)
    assert err.value.errors[0].startswith(f"{path}:1: (top level): ")
    errors, summary = check_config(None, path)
    assert errors and not summary


def test_reload_of_a_truncated_protocol_keeps_the_running_one(make_node: Any, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    protocol = {"destinations": {"tps": {"folder": {"path": str(tmp_path / "tps")}}},
                "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                             "destinations": ["tps"]}], "qa": LENIENT_QA}
    node = make_node(protocol)
    path = tmp_path / "protocol.yaml"
    path.write_text("")  # truncated to 0 bytes
    node.protocol_path = path
    before = node.protocol.audit_version
    assert node.reload() is False
    assert node.protocol.audit_version == before and set(node.destinations) == {"tps"}
    assert "protocol reload refused" in caplog.text and "the file is empty" in caplog.text
