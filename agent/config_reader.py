"""Reading the YAML config: typed sections that name keys in every error, and
the table of keys that moved (old files keep loading, with a warning)."""

from __future__ import annotations

import copy
import re
import reprlib
from typing import Any

from agent.errors import ConfigError

MAX_DEPTH = 32  # the deepest real setting is four levels down
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def show(value: Any) -> str:
    """A value quoted for an error, bounded: YAML aliases can make a small file hold
    a list whose plain repr would be gigabytes ("billion laughs")."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        return f"<{type(value).__name__}>"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else show(value)


def check_document(data: Any) -> None:
    """Refuse what no setting can hold before anything copies or reads the document:
    nesting past MAX_DEPTH, and NUL or lone surrogates in any key or string (a path
    with NUL fails only when first used; a surrogate cannot even be logged).

    Iterative, and a node that aliases share or contain is visited once.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ConfigError(f"{where or 'config'}: a NUL character in {show(item)}")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"{where or 'config'}: invalid Unicode (a lone surrogate) "
                                  f"in {show(item)}") from None
        elif isinstance(item, (dict, list)) and id(item) not in seen:
            seen.add(id(item))
            if depth >= MAX_DEPTH:
                raise ConfigError(f"{where or 'config'}: nested more than {MAX_DEPTH} levels "
                                  "deep")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, value in pairs:
                if isinstance(key, int):
                    inner = f"{where}[{key}]"
                else:
                    name = key if isinstance(key, str) and key.isprintable() else show(key)
                    inner = f"{where}.{name}" if where else name
                stack.append((key, inner, depth + 1))
                stack.append((value, inner, depth + 1))


class Section:
    """Typed access to one mapping of the YAML document, naming keys in errors."""

    def __init__(self, data: Any, where: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(f"{where or 'config'}: key {show(key)} is not a string")
        self.data: dict[str, Any] = data
        self.where = where
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(name)
        value = self.data.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise ConfigError(f"{self.key(name)}: expected a number, got {value!r}")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ConfigError(f"{self.key(name)}: expected {names}, got {show(value)}")
        return value

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.get(name, int, default)
        if not lo <= value <= hi:
            raise ConfigError(f"{self.key(name)}: {show(value)} is outside {lo}..{hi}")
        return int(value)

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self.get(name, (int, float), default)
        # Compared before float(): an int past 1e308 is out of range, not an OverflowError.
        if not lo <= value <= hi:
            raise ConfigError(f"{self.key(name)}: {_number(value)} is outside {lo:g}..{hi:g}")
        return float(value)

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        value = str(self.get(name, str, default))
        if value not in options:
            raise ConfigError(f"{self.key(name)}: {value!r} is not one of {', '.join(options)}")
        return value

    def path(self, name: str, default: str | None) -> Any:
        value = self.get(name, str, default)
        if value is not None and not value.startswith("/"):
            raise ConfigError(f"{self.key(name)}: {value!r} must be an absolute path")
        return value

    def address(self, name: str) -> tuple[str, int] | None:
        """``[host:]port``: a port alone binds loopback; IPv6 hosts in brackets."""
        value = self.get(name, (str, int), None)
        if value is None:
            return None
        where = self.key(name)
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected [host:]port, got {value!r}")
        host, sep, port = str(value).rpartition(":")
        if not sep:
            host = "127.0.0.1"
        elif host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ConfigError(f"{where}: put an IPv6 address in brackets, as in \"[::1]:9464\"")
        if not host or not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", host, re.ASCII):
            raise ConfigError(f"{where}: {value!r} has no valid host; give [host:]port, e.g. "
                              "9464 (loopback) or 0.0.0.0:9464 (every interface)")
        # ASCII digits only: str.isdigit() would take other scripts' digits too.
        if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{where}: {value!r} has no port in 1..65535")
        return host, int(port)

    def section(self, name: str) -> Section:
        self.used.add(name)
        return Section(self.data.get(name), self.key(name))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def optional_path(section: Section, name: str, default: str | None) -> str | None:
    """An absolute path, or "" to turn the feature off (absent: the default)."""
    if section.data.get(name) == "":
        section.used.add(name)
        return None
    return section.path(name, default)  # type: ignore[no-any-return]


# Keys that moved into a backend's sub-section: old path -> new path. Files in
# the old layout keep loading (a fleet's configs are not rewritten by an agent
# upgrade); `config validate` and the daemon's start say what to rename.
MOVED = {
    ("images", "local_dir"): ("images", "local", "dir"),
    ("images", "docker_host"): ("images", "docker", "host"),
    ("images", "docker_config"): ("images", "docker", "config"),
    ("transport", "spool_dir"): ("transport", "spool", "dir"),
    ("transport", "outbox_dir"): ("transport", "spool", "outbox_dir"),
    ("transport", "poll_interval_seconds"): ("transport", "spool", "poll_interval_seconds"),
    ("transport", "mqtt", "labels"): ("labels",),
}


def migrate(data: Any) -> tuple[Any, tuple[str, ...]]:
    """Move old keys to their new places; (data, one message per moved key)."""
    if not isinstance(data, dict):
        return data, ()
    data = copy.deepcopy(data)
    notes = []
    for old, new in MOVED.items():
        parent = _walk(data, old[:-1])
        if parent is None or old[-1] not in parent:
            continue
        target = _walk(data, new[:-1], create=True)
        if target is None:
            continue  # a non-mapping on the way: the normal parse names it
        if new[-1] in target:
            raise ConfigError(f"{'.'.join(old)}: moved to {'.'.join(new)}, which is also "
                              "set; keep only the new key")
        target[new[-1]] = parent.pop(old[-1])
        notes.append(f"{'.'.join(old)} is now {'.'.join(new)}; rename it "
                     "(the old key still works)")
    return data, tuple(notes)


def _walk(data: dict[str, Any], path: tuple[str, ...],
          create: bool = False) -> dict[str, Any] | None:
    for key in path:
        if create and data.get(key) is None:
            data[key] = {}
        nxt = data.get(key)
        if not isinstance(nxt, dict):
            return None
        data = nxt
    return data
