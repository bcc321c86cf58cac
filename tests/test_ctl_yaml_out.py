"""agent/ctl/yaml_out.py: the status's YAML reads back as the document, whatever
the text in it (reasons come from agents and keadm's output)."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ctl import yaml_out

TRICKY = ["", " ", "True", "false", "yes", "No", "on", "null", "~", "1", "1.0", "0x1f", ".inf",
          "1_000", "12:30", "2026-12-01T03:00:00Z", "2026-12-01", "- x", "-", "a: b", "a #b",
          "#x", "x ", " x", "'q'", '"q"', "[1]", "{a: 1}", "*a", "&a", "!t", "%p", "@x", "`x`",
          "|", ">", "...", "---", "a\nb", "a\r\nb", "tab\there", "\x00", "\x7f", "é", "💥",
          "\u2028", "\u0085", "\ufeffbom", "\ud7ff", "<<", "=", "?", "?x", ",", "a,b", "(x)"]


def round_trip(doc: Any) -> Any:
    return yaml.load(yaml_out.dump(doc), Loader=yaml.SafeLoader)


def test_tricky_scalars_read_back_as_themselves() -> None:
    doc = {"status": {"reason": TRICKY, "nodeStatus": [{"nodeName": t, "reason": t}
                                                       for t in TRICKY]}}
    assert round_trip(doc) == doc


def test_floats_read_back_as_floats() -> None:
    values = [0.5, -2.0, 1e16, 1e-7, float("inf"), float("-inf")]
    assert round_trip({"v": values}) == {"v": values}
    assert str(round_trip({"v": float("nan")})["v"]) == "nan"


def test_the_shape_is_pyyamls_block_style() -> None:
    doc = {"kind": "NodeUpgradeJob", "status": {"phase": "Completed", "nodeStatus": [
        {"nodeName": "n1", "actionFlow": [{"action": "Check", "status": "True"}],
         "empty": [], "none": None, "n": 3, "ok": True}]}}
    assert yaml_out.dump(doc) == yaml.safe_dump(doc, sort_keys=False, width=10_000) \
        .replace("'True'", '"True"')


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | \
    st.text(max_size=30) | st.sampled_from(TRICKY)
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(min_size=1, max_size=12) | st.sampled_from(TRICKY[1:]), inner, max_size=4),
    max_leaves=25)


@settings(max_examples=300)
@given(st.dictionaries(st.text(min_size=1, max_size=12), documents, min_size=1, max_size=4))
def test_any_document_reads_back(doc: dict[str, Any]) -> None:
    assert round_trip(doc) == doc
