"""agent.lean.ascii_idna: ASCII host names without encodings.idna (issue 10).

``socket.getaddrinfo`` and ``ssl`` encode every host name with the ``idna``
codec; the standard one imports ``stringprep`` and ``unicodedata`` (0.35 MiB)
for Unicode names. The agent's codec must answer exactly as the standard one
for every input: the same bytes, or an error where the standard one raises.
"""

from __future__ import annotations

import codecs
import encodings.idna
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from hypothesis import given
from hypothesis import strategies as st

from agent import lean

lean.ascii_idna()  # this interpreter has the real module loaded: compared below
REAL = encodings.idna.Codec()


def _both(text: str) -> tuple[object, object]:
    def run(encode: object) -> object:
        try:
            return encode(text)  # type: ignore[operator]
        except UnicodeError:
            return UnicodeError
    return run(lambda t: t.encode("idna")), run(lambda t: REAL.encode(t)[0])


@pytest.mark.parametrize("name", [
    "", "broker", "broker.example", "broker.example.", "127.0.0.1", "::1", "a" * 63,
    "a" * 64, "a" * 63 + ".b", "a" * 64 + ".b", "a..b", ".a", "..", "-x.example",
    "bücher.example", "ΑΒΓ.example", "xn--bcher-kva.example", "BROKER.Example",
])
def test_answers_as_the_standard_codec(name: str) -> None:
    assert codecs.lookup("idna").encode is lean._idna_encode  # ours answers, not the real one
    ours, real = _both(name)
    assert ours == real


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F) | st.sampled_from(
    [".", "ü", "。", "\u00ad"]), max_size=140))
def test_any_text_as_the_standard_codec(text: str) -> None:
    ours, real = _both(text)
    assert ours == real


def test_decoding_and_the_incremental_forms_are_the_standard_ones() -> None:
    assert b"xn--bcher-kva.example".decode("idna") == "bücher.example"
    assert b"".join(codecs.iterencode(["bücher.", "example"], "idna")) == \
        b"xn--bcher-kva.example"
    assert "".join(codecs.iterdecode([b"xn--bcher-kva.", b"example"], "idna")) == \
        "bücher.example"
    with pytest.raises(UnicodeError):
        "broker".encode("idna", "replace")  # IDNA is strict only, as the standard says


# A fresh interpreter: a host name resolved and a TLS client's server name set,
# as paho does for the broker, with no Unicode name anywhere.
FRESH = """
import json, socket, ssl, sys
from agent import lean
lean.ascii_idna()
socket.getaddrinfo("localhost", 1883)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="broker.example")
ascii_only = [m for m in ("encodings.idna", "stringprep", "unicodedata") if m in sys.modules]
unicode = "bücher.example".encode("idna").decode()
print(json.dumps({"name": obj.server_hostname, "ascii_only": ascii_only, "unicode": unicode,
                  "loaded": "encodings.idna" in sys.modules}))
"""


def test_a_broker_connection_does_not_load_the_unicode_tables() -> None:
    proc = subprocess.run([sys.executable, "-c", FRESH], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert json.loads(proc.stdout) == {"name": "broker.example", "ascii_only": [],
                                       "unicode": "xn--bcher-kva.example", "loaded": True}
