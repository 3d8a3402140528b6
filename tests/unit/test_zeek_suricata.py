"""docs/zeek-suricata.md's commands train on real Zeek conn and Suricata EVE flow records, and the bundles'
features are the dotted paths the page documents (nested objects flattened, Zeek's dotted keys kept).

Each training test trains a tiny model (5-15 s; about 45 s together), hence `slow`."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.unit.conftest import TRAIN_ARGS
from training.bundle import load_bundle
from training.cli import train_main

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "zeek-suricata.md"
FIXTURES = ROOT / "tests" / "fixtures"
FLOW_FILTER = """jq -c 'select(.event_type == "flow")' tests/fixtures/suricata/eve.json > flows.json"""

ZEEK_CATEGORICAL = {"id.resp_p", "proto", "service", "conn_state", "history"}
ZEEK_FEATURES = ZEEK_CATEGORICAL | {
    "duration", "orig_bytes", "resp_bytes", "missed_bytes", "orig_pkts", "orig_ip_bytes", "resp_pkts",
    "resp_ip_bytes", "local_orig", "local_resp"}
SURICATA_CATEGORICAL = {"dest_port", "proto", "app_proto", "flow.state", "tcp.state", "tcp.tcp_flags",
                        "tcp.tcp_flags_ts", "tcp.tcp_flags_tc"}
SURICATA_FEATURES = SURICATA_CATEGORICAL | {
    "flow.pkts_toserver", "flow.pkts_toclient", "flow.bytes_toserver", "flow.bytes_toclient", "flow.age"}


def window_features(entity: str, categorical: list[str], numeric: list[str]) -> set[str]:
    prefix = f"win:{entity}:60s:"
    return ({prefix + "count"} | {f"{prefix}distinct:{name}" for name in categorical}
            | {f"{prefix}{stat}:{name}" for name in numeric for stat in ("mean", "max", "ratio")})


def doc_commands() -> dict[str, list[str]]:
    """The page's `anomaly-train` commands (arguments after the program name), by their --out folder."""
    text = DOC.read_text(encoding="utf-8")
    commands = {}
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line)
            if argv and argv[0] == "anomaly-train":
                commands[argv[argv.index("--out") + 1]] = argv[1:]
    return commands


def flow_events(tmp_path: Path) -> Path:
    """The page's jq filter, in Python: the `flow` events of the Suricata fixture, as flows.json."""
    assert FLOW_FILTER in DOC.read_text(encoding="utf-8")
    lines = (FIXTURES / "suricata" / "eve.json").read_text(encoding="utf-8").splitlines()
    flows = [line for line in lines if json.loads(line)["event_type"] == "flow"]
    assert 0 < len(flows) < len(lines)
    out = tmp_path / "flows.json"
    out.write_text("".join(f"{line}\n" for line in flows), encoding="utf-8")
    return out


def train(tmp_path: Path, out: str, capsys: pytest.CaptureFixture[str]) -> tuple[set[str], set[str], str]:
    """Run the page's command that writes `out` on the fixture, cheaply; the model's fields, its categorical
    ones, and what training printed."""
    argv = doc_commands()[out]
    argv[argv.index("--out") + 1] = str(tmp_path / "bundle")
    data = argv.index("--data") + 1
    argv[data] = str(flow_events(tmp_path) if argv[data] == "flows.json" else ROOT / argv[data])
    code = train_main([*argv, *TRAIN_ARGS, "--ensemble", "1"])  # the page's flags, then tiny-model ones
    printed, err = capsys.readouterr()
    assert code == 0, err
    schema = load_bundle(tmp_path / "bundle").schema
    return set(schema.names), set(schema.categorical_names), printed


def test_the_page_has_each_command() -> None:
    assert set(doc_commands()) == {"models/zeek-conn", "models/zeek-conn-tagged", "models/suricata-flow",
                                   "models/zeek-conn-windows", "models/suricata-flow-windows"}


@pytest.mark.slow
def test_zeek_conn_json_trains_on_its_dotted_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names, categorical, printed = train(tmp_path, "models/zeek-conn", capsys)
    assert names == ZEEK_FEATURES
    assert categorical == ZEEK_CATEGORICAL
    assert "34 rows" in printed


@pytest.mark.slow
def test_zeek_tag_json_fields_are_paths_under_conn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names, categorical, _ = train(tmp_path, "models/zeek-conn-tagged", capsys)
    assert names == {f"conn.{name}" for name in ZEEK_FEATURES}
    assert categorical == {f"conn.{name}" for name in ZEEK_CATEGORICAL}


@pytest.mark.slow
def test_suricata_flow_events_train_on_flattened_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names, categorical, printed = train(tmp_path, "models/suricata-flow", capsys)
    assert names == SURICATA_FEATURES
    assert categorical == SURICATA_CATEGORICAL
    assert "278 rows" in printed


@pytest.mark.slow
def test_zeek_windows_follow_the_originator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names, _, _ = train(tmp_path, "models/zeek-conn-windows", capsys)
    windows = window_features("id.orig_h", ["id.resp_p", "conn_state"], ["orig_bytes"])
    assert names == ZEEK_FEATURES | windows
    assert not {"id.orig_h", "ts"} & names  # the entity and the time key the windows; the model never sees them


@pytest.mark.slow
def test_suricata_windows_follow_the_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names, _, _ = train(tmp_path, "models/suricata-flow-windows", capsys)
    windows = window_features("src_ip", ["dest_port", "flow.state"], ["flow.bytes_toserver"])
    assert names == SURICATA_FEATURES | windows
    assert not {"src_ip", "flow.start"} & names
