"""Node config and protocol: defaults, shipped files, precise errors, eligibility reasons."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from rtcontrast.settings.node import ConfigError, NodeConfig, load_node_config
from rtcontrast.node.dispatch.destinations import DicomDestination, FolderDestination, build_destinations
from rtcontrast.core.physics import SEED_CONTRASTS
from rtcontrast.settings.protocol import MatchRules, ProtocolConfig, load_protocol
from rtcontrast.dicom.eligibility import check_eligibility, header_te_tr

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def errors_of(fn, path: Path) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as exc:
        fn(path)
    return exc.value.errors


# -- defaults and shipped files ----------------------------------------------------
def test_embedded_defaults_need_no_file() -> None:
    node = load_node_config(None)
    assert (node.ae_title, node.port, node.var_dir) == ("RTCONTRAST", 11112, Path("var"))
    assert node.spool_path == Path("var/spool") and node.db_file == Path("var/rtcontrast.db")
    assert node.export_path == Path("var/export") and node.outbox_path == Path("var/outbox")
    proto = load_protocol(None)
    assert proto.destinations["export"].folder is not None
    assert proto.destinations["export"].folder.path == Path("var/export")
    pairs = [(r.te_ms, r.tr_ms) for r in proto.recipes]
    assert all(p in pairs for p in SEED_CONTRASTS)
    assert len(pairs) >= 7 and len({r.series_number for r in proto.recipes}) == len(pairs)
    assert all(r.series_description.startswith("SYNTH") and len(r.series_description) <= 64 for r in proto.recipes)


def test_shipped_files_equal_embedded_defaults() -> None:
    assert load_node_config(REPO / "config/node.yaml") == NodeConfig()
    shipped = load_protocol(REPO / "config/protocol.yaml")
    assert shipped == ProtocolConfig()
    assert shipped.content_hash == ProtocolConfig().content_hash
    assert shipped.audit_version.startswith("1+sha256:")


def test_content_hash_changes_with_content() -> None:
    a = ProtocolConfig()
    b = a.model_copy(deep=True)
    b.recipes[0].te_ms = 80
    assert a.content_hash != b.content_hash


def test_build_destinations(tmp_path: Path) -> None:
    p = write(tmp_path, "p.yaml", """
        destinations:
          export: {folder: {path: out}}
          tps: {dicom: {host: 127.0.0.1, port: 104, ae_title: TPS}}
        recipes:
          - {key: a, label: A, te_ms: 80, tr_ms: 3000, series_number: 950, destinations: [tps, export]}
    """)
    dests = build_destinations(load_protocol(p), "NODE")
    assert dests["export"] == FolderDestination("export", Path("out"))
    assert isinstance(dests["tps"], DicomDestination)
    assert (dests["tps"].calling_ae, dests["tps"].ae_title, dests["tps"].port) == ("NODE", "TPS", 104)


# -- errors with lines and paths ---------------------------------------------------
def test_protocol_errors_have_lines_and_paths(tmp_path: Path) -> None:
    p = write(tmp_path, "protocol.yaml", """
        version: "2"
        destinations:
          export:
            folder: {path: ./x}
        match:
          modality: MR
          series_description_regex: "(unclosed"
          colour: blue
        recipes:
          - key: a
            label: A
            te_ms: 80
            tr_ms: 3000
            series_number: 950
            destinations: [export]
          - key: a
            label: B
            te_ms: -5
            tr_ms: 3000
            series_number: 950
            destinations: [tps]
          - label: C
            te_ms: 10
            tr_ms: 500
            series_number: 12
            destinations: [export]
    """)
    errs = errors_of(load_protocol, p)
    name = str(p)
    expected = [
        f"{name}:7: match.series_description_regex: Value error, invalid regular expression",
        f"{name}:8: match.colour: unknown key (known keys here: modality, ",
        f"{name}:16: recipes[1].key: duplicate recipe key 'a' (also recipes[0].key)",
        f"{name}:18: recipes[1].te_ms: Input should be greater than 0",
        f"{name}:20: recipes[1].series_number: duplicate series number 950 (also recipes[0].series_number)",
        f"{name}:21: recipes[1].destinations[0]: unknown destination 'tps' (defined: export)",
        f"{name}:22: recipes[2].key: Field required",
        f"{name}:25: recipes[2].series_number: series number 12 is outside series_number_range 900-999",
    ]
    for want in expected:
        assert any(e.startswith(want) for e in errs), (want, errs)
    assert len(errs) == len(expected), errs
    # the message reads like the example in the docs
    assert f"{name}:18: recipes[1].te_ms: Input should be greater than 0" in errs


def test_node_config_errors(tmp_path: Path) -> None:
    p = write(tmp_path, "node.yaml", """
        ae_title: THIS_AE_TITLE_IS_TOO_LONG
        port: 70000
        limits:
          max_associations: 0
          max_pdus: 5
        execution_provider: tpu
        allowed_ips: [10.0.0.0/8, not-an-ip]
        uid_root: "1.2.03"
    """)
    errs = errors_of(load_node_config, p)
    name = str(p)
    for want in [
        f"{name}:1: ae_title: Value error, an AE title is 1 to 16",
        f"{name}:2: port: Input should be less than or equal to 65535",
        f"{name}:4: limits.max_associations: Input should be greater than or equal to 1",
        f"{name}:5: limits.max_pdus: unknown key (did you mean 'max_pdu_bytes'?)",
        f"{name}:6: execution_provider: Input should be 'auto', 'cpu' or 'cuda'",
        f"{name}:7: allowed_ips: Value error, 'not-an-ip' is not an IP address",
        f"{name}:8: uid_root: Value error, a UID root",
    ]:
        assert any(e.startswith(want) for e in errs), (want, errs)
    assert len(errs) == 7, errs


def test_yaml_syntax_error_and_duplicate_keys(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", """
        ae_title: A
        limits:
          max_associations: [1, 2
        port: 1
    """)
    [err] = errors_of(load_node_config, bad)
    assert err.startswith(f"{bad}:") and "YAML syntax error" in err
    dup = write(tmp_path, "dup.yaml", """
        port: 104
        ae_title: A
        port: 105
    """)
    assert errors_of(load_node_config, dup) == [f"{dup}:3: port: duplicate key"]
    notmap = write(tmp_path, "list.yaml", "- a\n- b\n")
    assert "expected a mapping" in errors_of(load_node_config, notmap)[0]
    assert "cannot read" in errors_of(load_node_config, tmp_path / "missing.yaml")[0]


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    """An empty node config means the defaults; an empty protocol is an error (#15, tests/test_protocol_safety.py)."""
    assert load_node_config(write(tmp_path, "e.yaml", "# nothing\n")) == NodeConfig()
    assert "the file is empty" in errors_of(load_protocol, write(tmp_path, "p.yaml", ""))[0]


def test_destination_errors(tmp_path: Path) -> None:
    p = write(tmp_path, "p.yaml", """
        destinations:
          both:
            folder: {path: x}
            dicom: {host: h, port: 104, ae_title: T}
          tps:
            dicom: {host: h, port: 0, ae_title: T}
          bad/name:
            folder: {path: y}
        recipes:
          - {key: a, label: A, te_ms: 80, tr_ms: 3000, series_number: 950, destinations: [tps]}
        maps: {classic: true, destinations: [nowhere]}
    """)
    errs = errors_of(load_protocol, p)
    name = str(p)
    for want in [
        f"{name}:2: destinations.both: Value error, a destination has exactly one of 'dicom' or 'folder'",
        f"{name}:6: destinations.tps.dicom.port: Input should be greater than or equal to 1",
        f"{name}:7: destinations.bad/name: a destination name is",
        f"{name}:11: maps.destinations[0]: unknown destination 'nowhere'",
    ]:
        assert any(e.startswith(want) for e in errs), (want, errs)
    assert len(errs) == 4, errs


def test_programmatic_protocol_is_cross_checked() -> None:
    with pytest.raises(ValueError, match="unknown destination 'tps'"):
        ProtocolConfig(recipes=[{"key": "a", "label": "A", "te_ms": 1, "tr_ms": 2, "series_number": 950,
                                 "destinations": ["tps"]}])


# -- eligibility ---------------------------------------------------------------------
@pytest.fixture
def se() -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = ["SK", "SP", "OSP"]
    ds.EchoTime = 80
    ds.RepetitionTime = 3000
    ds.EchoTrainLength = 1
    ds.SequenceName = "*se2d1"
    ds.SeriesDescription = "T2 axial"
    return ds


def test_eligible_spin_echo(se: Dataset) -> None:
    ok, why = check_eligibility(se, MatchRules(), "SCANNER")
    assert ok, why
    assert why == "eligible: spin-echo, TE 80 ms, TR 3000 ms"
    assert header_te_tr(se) == (80.0, 3000.0)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"ScanningSequence": "GR"}, "ScanningSequence 'GR' is gradient echo: not spin-echo"),
        ({"ScanningSequence": ["SE", "IR"]}, "ScanningSequence 'SE\\IR' is inversion recovery: not plain spin-echo"),
        ({"ScanningSequence": "RM"}, "ScanningSequence 'RM' does not include SE (spin echo)"),
        ({"ScanningSequence": None}, "ScanningSequence missing"),
        ({"SequenceVariant": ["SK", "MP"]},
         "SequenceVariant 'SK\\MP' includes MP (magnetization prepared): not plain spin-echo"),
        ({"EchoTime": None}, "TE missing"),
        ({"RepetitionTime": None}, "TR missing"),
        ({"EchoTime": 0}, "TE 0 ms is not positive"),
        ({"Modality": "CT"}, "Modality 'CT' is not MR"),
        ({"Modality": None}, "Modality missing"),
    ],
)
def test_ineligible_reasons(se: Dataset, change: dict, reason: str) -> None:
    for kw, value in change.items():
        if value is None:
            delattr(se, kw)
        else:
            setattr(se, kw, value)
    assert check_eligibility(se, MatchRules(), "SCANNER") == (False, reason)


def test_regexes_calling_ae_and_fse(se: Dataset) -> None:
    rules = MatchRules(series_description_regex="^T1")
    assert check_eligibility(se, rules) == (False, "SeriesDescription 'T2 axial' does not match '^T1'")
    assert check_eligibility(se, MatchRules(series_description_regex="^T2"))[0]
    se.BodyPartExamined = "HEAD"
    assert check_eligibility(se, MatchRules(body_part_regex="(?i)pelvis")) == (
        False, "BodyPartExamined 'HEAD' does not match '(?i)pelvis'")
    ok, why = check_eligibility(se, MatchRules(calling_aes=["MR1"]), "OTHER")
    assert not ok and why.startswith("calling AE 'OTHER' is not one of")
    assert check_eligibility(se, MatchRules(calling_aes=["MR1"]), "MR1")[0]

    se.EchoTrainLength = 15
    ok, why = check_eligibility(se, MatchRules())
    assert ok and "fast spin-echo (EchoTrainLength 15)" in why
    assert check_eligibility(se, MatchRules(allow_fse=False)) == (
        False, "fast/turbo spin-echo (EchoTrainLength 15) and the protocol has allow_fse false")
    se.EchoTrainLength = 1
    se.SequenceName = "*tse2d1_15"
    assert not check_eligibility(se, MatchRules(allow_fse=False))[0]
    # a whole protocol works as rules too
    assert check_eligibility(se, ProtocolConfig())[0]


def _enhanced(echo_pulse: str, ir: str = "NO") -> Dataset:
    ds = Dataset()
    ds.Modality = "MR"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.EchoPulseSequence = echo_pulse
    shared = Dataset()
    timing = Dataset()
    timing.RepetitionTime = 4000
    timing.EchoTrainLength = 1
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    mod = Dataset()
    mod.InversionRecovery = ir
    shared.MRModifierSequence = Sequence([mod])
    frame = Dataset()
    echo = Dataset()
    echo.EffectiveEchoTime = 90
    frame.MREchoSequence = Sequence([echo])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
    return ds


def test_enhanced_mr_headers() -> None:
    ok, why = check_eligibility(_enhanced("SPIN"), MatchRules())
    assert ok and why == "eligible: spin-echo, TE 90 ms, TR 4000 ms"
    assert check_eligibility(_enhanced("GRADIENT"), MatchRules()) == (
        False, "EchoPulseSequence 'GRADIENT' is gradient echo: not spin-echo")
    assert check_eligibility(_enhanced("BOTH"), MatchRules())[1].startswith("EchoPulseSequence 'BOTH'")
    assert check_eligibility(_enhanced("SPIN", ir="YES"), MatchRules()) == (
        False, "InversionRecovery 'YES' is inversion recovery: not plain spin-echo")
    ds = _enhanced("SPIN")
    del ds.EchoPulseSequence
    ds.SharedFunctionalGroupsSequence[0].MRModifierSequence[0].EchoPulseSequence = "GRADIENT"
    assert not check_eligibility(ds, MatchRules())[0]
    ds = _enhanced("SPIN")
    del ds.PerFrameFunctionalGroupsSequence[0].MREchoSequence
    assert check_eligibility(ds, MatchRules()) == (False, "TE missing")


def test_deepcopy_of_config_is_equal() -> None:
    p = ProtocolConfig()
    assert copy.deepcopy(p) == p


# -- #16: check-config as an admin meets it ------------------------------------------
@pytest.mark.parametrize("text, line, words", [
    # a key without ':' - PyYAML notices only on the next line
    ("ae_title: A\nlog_format json\nport: 104\n", 2, "missing ':'"),
    # a key indented one space less than its block
    ("ae_title: A\nlimits:\n  max_associations: 5\n max_pdu_bytes: 1000\nport: 104\n", 4, "bad indentation"),
    # a key indented deeper than the one above
    ("ae_title: A\nport: 104\n  log_format: json\n", 3, "indented deeper"),
    # an unclosed quote: PyYAML points at the end of the file
    ('ae_title: "A\nport: 104\nlog_level: INFO\n', 1, "quote opened here is never closed"),
    ("ae_title: A\nlimits: {max_associations: 5\nport: 104\n", 2, "'{' opened here"),
    ("ae_title: A\n\tport: 104\n", 2, "tab character"),
])
def test_yaml_syntax_errors_in_plain_words_at_the_line_to_edit(tmp_path: Path, text: str, line: int,
                                                                 words: str) -> None:
    p = tmp_path / "node.yaml"
    p.write_text(text)
    [err] = errors_of(load_node_config, p)
    assert err.startswith(f"{p}:{line}: YAML syntax error: "), err
    assert words in err and "<block" not in err, err


def test_unknown_keys_get_did_you_mean(tmp_path: Path) -> None:
    node = write(tmp_path, "node.yaml", """
        ae_titel: A
        metrics:
          prot: 9111
        completely_unrelated: 1
    """)
    errs = errors_of(load_node_config, node)
    assert f"{node}:1: ae_titel: unknown key (did you mean 'ae_title'?)" in errs
    assert f"{node}:3: metrics.prot: unknown key (did you mean 'port'?)" in errs
    assert any(e.startswith(f"{node}:4: completely_unrelated: unknown key (known keys here: ae_title,")
               for e in errs), errs
    proto = write(tmp_path, "protocol.yaml", """
        destinations:
          tps:
            dicom: {host: h, port: 104, ae_title: T, hots: x}
        recipes:
          - {key: a, label: T2w, te_ms: 80, tr_ms: 4000, series_number: 901, destinations: [tps], tr: 5}
    """)
    errs = errors_of(load_protocol, proto)
    assert f"{proto}:3: destinations.tps.dicom.hots: unknown key (did you mean 'host'?)" in errs
    assert f"{proto}:5: recipes[0].tr: unknown key (did you mean 'tr_ms'?)" in errs


def test_semantic_checks_tr_shorter_than_te_and_ports(tmp_path: Path) -> None:
    proto = write(tmp_path, "protocol.yaml", """
        recipes:
          - {key: a, label: T2w, te_ms: 80, tr_ms: 60, series_number: 901, destinations: [export]}
          - {key: b, label: T2w TE75 TR4500, te_ms: 120, tr_ms: 4500, series_number: 902, destinations: [export]}
    """)
    errs = errors_of(load_protocol, proto)
    assert f"{proto}:2: recipes[0].tr_ms: TR 60 ms is not longer than TE 80 ms: a spin echo needs TR > TE" in errs
    assert any(e.startswith(f"{proto}:3: recipes[1].label: label says TE 75 but te_ms is 120") for e in errs), errs
    node = write(tmp_path, "node.yaml", """
        port: 11112
        metrics:
          port: 11112
    """)
    assert errors_of(load_node_config, node) == [
        f"{node}:3: metrics.port: metrics.port and port are both 11112: the metrics endpoint and the DICOM "
        "listener need different ports"]
    off = write(tmp_path, "off.yaml", "port: 9110\nmetrics: {enabled: false}\n")
    assert load_node_config(off).port == 9110  # no metrics listener: no clash


def test_shipped_recipes_name_te_tr_once() -> None:
    for r in load_protocol(REPO / "config" / "protocol.yaml").recipes:
        d = r.series_description
        assert d.count("TE") == 1 and d.count("TR") == 1, d
        assert f"TE{r.te_ms:g}" in d and f"TR{r.tr_ms:g}" in d, d
    from rtcontrast.settings.protocol import Recipe

    bare = Recipe(key="x", label="T2w", te_ms=90, tr_ms=4000, series_number=901, destinations=["e"])
    assert bare.series_description == "SYNTH T2w TE90 TR4000"


def test_check_config_reports_every_error_at_once(tmp_path: Path) -> None:
    import os

    from rtcontrast.node.admin import check_config

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    node = write(tmp_path, "node.yaml", f"""
        ae_title: A
        port: 70000
        var_dir: {locked}/var
        model_path: {tmp_path}/missing.onnx
    """)
    proto = write(tmp_path, "protocol.yaml", """
        recipes:
          - {key: a, label: T2w, te_ms: 80, tr_ms: 60, series_number: 901, destinations: [export]}
    """)
    try:
        errors, summary = check_config(node, proto)
    finally:
        locked.chmod(0o700)
    assert summary == ""
    assert errors[0].startswith(f"{node}:2: port: ")
    if os.geteuid() != 0:  # root may write anywhere
        assert any(e.startswith(f"{node}:3: var_dir: var_dir '{locked}/var' cannot be created") for e in errors), errors
    assert any(e.startswith(f"{node}:4: model_path: ") and "does not exist" in e for e in errors), errors
    assert errors[-1].startswith(f"{proto}:2: recipes[0].tr_ms: TR 60 ms"), errors
    # a file where var_dir should be a directory is caught for root too
    (tmp_path / "afile").write_text("x")
    node2 = write(tmp_path, "node2.yaml", f"var_dir: {tmp_path}/afile/var\n")
    errors, _ = check_config(node2, None)
    assert errors == [f"{node2}:1: var_dir: var_dir '{tmp_path}/afile/var': '{tmp_path}/afile' is not a directory"]
