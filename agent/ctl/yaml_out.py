"""Block-style YAML for the controller's documents, without PyYAML's representer.

The final status of 10,000 nodes is about 450,000 scalars. PyYAML represents
each one in Python before libyaml emits it: 3.5 s of a rollout's drain, where
this module takes a fraction of that (bench/fleet.py, docs/performance.md). It
writes only what the status holds (mappings with string keys, lists, strings,
numbers, booleans, None) and chooses each string's style conservatively:

- plain when it is made of letters, digits, ``_./()+,-`` and spaces, starts
  with none of space, ``-``, ``.`` and ``,``, and PyYAML's resolver reads it back as a
  string (not ``True``, ``1.0``, ``null`` or a timestamp);
- JSON's double quotes when it is printable ASCII (a JSON string of printable
  ASCII is a YAML double-quoted scalar with the same value);
- anything else (line breaks, controls, non-ASCII) in PyYAML's own double-quoted
  style, which escapes what YAML cannot carry raw.

``yaml.safe_load`` of the text gives back the document: tests/test_ctl_yaml_out.py
checks that against arbitrary text.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import yaml

_PLAIN = re.compile(r"[A-Za-z0-9_/()+][A-Za-z0-9_./()+, -]*")
_ASCII = re.compile(r"[\x20-\x7e]*")
_RESOLVER = yaml.resolver.Resolver()
_STR = "tag:yaml.org,2002:str"
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump(doc: Any) -> str:
    out: list[str] = []
    _node(doc, 0, out)
    return "".join(out)


def _node(value: Any, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, dict) and value:
        for key, item in value.items():
            out.append(f"{pad}{scalar(str(key))}:")
            _child(item, indent, out, nested=indent + 2)
    elif isinstance(value, list) and value:
        for item in value:
            if isinstance(item, dict) and item:
                # "- " carries the item's first key; the rest line up under it.
                first = True
                for key, sub in item.items():
                    out.append(f"{pad}- {scalar(str(key))}:" if first else
                               f"{pad}  {scalar(str(key))}:")
                    _child(sub, indent + 2, out, nested=indent + 4)
                    first = False
            else:
                out.append(f"{pad}-")
                _child(item, indent + 2, out, nested=indent + 2)
    else:
        out.append(f"{pad}{_inline(value)}\n")


def _child(value: Any, indent: int, out: list[str], *, nested: int) -> None:
    """After ``key:`` or ``-``: a scalar on the same line, a collection below.
    A list under a key sits at the key's own indent, as PyYAML writes it."""
    if isinstance(value, dict) and value:
        out.append("\n")
        _node(value, nested, out)
    elif isinstance(value, list) and value:
        out.append("\n")
        _node(value, indent, out)
    else:
        out.append(f" {_inline(value)}\n")


def _inline(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # YAML's own spelling: json.dumps writes NaN, Infinity and 1e+16, which a
        # YAML 1.1 loader reads back as strings.
        return str(yaml.dump(value, Dumper=_DUMPER)).split("\n", 1)[0]
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return scalar(str(value))


@functools.lru_cache(maxsize=4096)  # phases, actions, versions and reasons repeat
def scalar(text: str) -> str:
    if _PLAIN.fullmatch(text) and not text.endswith(" ") and \
            _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)) == _STR:  # type: ignore[no-untyped-call]
        return text
    if _ASCII.fullmatch(text):
        return json.dumps(text)
    quoted: str = yaml.dump(text, Dumper=_DUMPER, default_style='"', allow_unicode=True,
                            width=2**31 - 1)
    return quoted.rstrip("\n").removesuffix("\n...")
