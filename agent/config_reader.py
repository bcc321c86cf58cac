"""Typed access to one mapping of the YAML config, naming keys in every error."""

from __future__ import annotations

from typing import Any

from agent.errors import ConfigError


class Section:
    """Typed access to one mapping of the YAML document, naming keys in errors."""

    def __init__(self, data: Any, where: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(f"{where or 'config'}: key {key!r} is not a string")
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
            raise ConfigError(f"{self.key(name)}: expected {names}, got {value!r}")
        return value

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.get(name, int, default)
        if not lo <= value <= hi:
            raise ConfigError(f"{self.key(name)}: {value} is outside {lo}..{hi}")
        return int(value)

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value = float(self.get(name, (int, float), default))
        if not lo <= value <= hi:
            raise ConfigError(f"{self.key(name)}: {value:g} is outside {lo:g}..{hi:g}")
        return value

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

    def section(self, name: str) -> Section:
        self.used.add(name)
        return Section(self.data.get(name), self.key(name))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")
