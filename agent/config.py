"""The agent's configuration: one YAML file parsed once into frozen dataclasses.

Every error names the key (``policy.max_minor_skip``) and the problem. Node
paths are absolute as on a real host; ``paths.root`` (or ``--root``) prefixes
all of them so a sandbox directory can stand in for ``/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from agent.adapters.images import LocalSettings
from agent.adapters.service import SystemdSettings
from agent.backends import (
    IMAGE_BACKENDS,
    SERVICE_MANAGERS,
    TRANSPORTS,
    Configurable,
    image_plugin,
    service_plugin,
    transport_plugin,
)
from agent.config_reader import Section, check_document, migrate
from agent.errors import ConfigError, InvalidCommand
from agent.transport.spool import SpoolSettings
from agent.versions import NAME_RE, VersionPolicy, parse_image

DEFAULT_CONFIG = Path("/etc/edge-upgrade-agent/agent.yaml")
CHECK_ITEMS = ("cpu", "mem", "disk")
PLACEHOLDERS = frozenset(
    {"keadm", "from_version", "to_version", "image", "repo", "config", "upgrade_id",
     "history_id"}
)


@dataclass(frozen=True)
class Paths:
    root: Path = Path("/")
    edgecore_binary: str = "/usr/local/bin/edgecore"
    edgecore_config: str = "/etc/kubeedge/config/edgecore.yaml"
    edgecore_db: str | None = None  # None: database.dataSource from edgecore.yaml
    # None: <state_dir>/backups. Never keadm's /etc/kubeedge/backup, which
    # keadm overwrites with a live copy during the very upgrade we back up.
    backup_dir: str | None = None
    keadm_lock: str = "/etc/kubeedge/idempotency_record"
    state_dir: str = "/var/lib/edge-upgrade-agent"
    run_dir: str = "/run"

    def node(self, path: str) -> Path:
        """Map an absolute node path into the (possibly sandboxed) root."""
        return self.root / path.lstrip("/")


@dataclass(frozen=True)
class Precheck:
    cpu_max_percent: float = 80.0
    mem_max_percent: float = 80.0
    disk_max_percent: float = 80.0
    reserve_bytes: int = 100 * 1024 * 1024


@dataclass(frozen=True)
class Health:
    grace_seconds: float = 30.0
    start_timeout_seconds: float = 60.0
    poll_interval_seconds: float = 1.0
    metaserver_url: str | None = None


@dataclass(frozen=True)
class RegistryAuth:
    registry: str  # host[:port] as in image references; docker.io for Docker Hub
    username: str
    password_file: str  # a file, so systemd's LoadCredential= can provide it


@dataclass(frozen=True)
class Images:
    backend: str = "local"  # a name in agent.backends.IMAGE_BACKENDS
    # That backend's own sub-section (images.<backend>), as its parse_settings gave it.
    settings: Any = field(default_factory=LocalSettings)
    default_repo: str = "kubeedge/installation-package"
    # Checked at intake, before any network call. Empty repositories: any in
    # an allowed registry; entries ending in "/*" match a prefix.
    allowed_registries: tuple[str, ...] = ("docker.io",)
    allowed_repositories: tuple[str, ...] = ()
    credentials: tuple[RegistryAuth, ...] = ()
    progress_interval_seconds: float = 5.0

    # Every other backend's sub-section that was present, parsed (for ``auto``).
    others: tuple[tuple[str, Any], ...] = ()

    def settings_for(self, name: str) -> Any:
        """A backend's settings: chosen, present in the file, or its defaults."""
        if name == self.backend:
            return self.settings
        found = dict(self.others).get(name)
        return found if found is not None else \
            image_plugin(name).parse_settings(Section(None, f"images.{name}"))

    def allows(self, registry: str, repo: str) -> bool:
        if registry not in self.allowed_registries:
            return False
        return not self.allowed_repositories or any(
            repo == pat or (pat.endswith("/*") and repo.startswith(pat[:-1]))
            for pat in self.allowed_repositories)


@dataclass(frozen=True)
class Security:
    require_signed_commands: bool = False
    trusted_keys_dir: str = "/etc/edge-upgrade-agent/trusted-keys"
    max_clock_skew_seconds: float = 300.0


@dataclass(frozen=True)
class Transport:
    kind: str = "spool"  # a name in agent.backends.TRANSPORTS
    settings: Any = field(default_factory=SpoolSettings)  # transport.<kind>, parsed
    max_message_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Metrics:
    """``metrics``: off unless ``listen`` or ``textfile`` is set (agent/metrics.py)."""

    listen: tuple[str, int] | None = None  # (host, port) of GET /metrics; None: no endpoint
    textfile: str | None = None  # agent path of a node_exporter textfile; None: none
    textfile_interval_seconds: float = 60.0

    @property
    def enabled(self) -> bool:
        return self.listen is not None or self.textfile is not None


@dataclass(frozen=True)
class Config:
    node_name: str
    paths: Paths = field(default_factory=Paths)
    service_manager: str = "systemd"  # a name in agent.backends.SERVICE_MANAGERS
    service_settings: Any = field(default_factory=SystemdSettings)  # service.<manager>
    edgecore_unit: str = "edgecore.service"
    edgecore_unit_file: str | None = None  # None: /etc/systemd/system/<unit>
    preserve_unit: bool = True  # put the operator's unit back after keadm rewrote it
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    default_timeout_seconds: int = 300
    max_state_entries: int = 5
    keep_backups: int = 3
    precheck: Precheck = field(default_factory=Precheck)
    health: Health = field(default_factory=Health)
    images: Images = field(default_factory=Images)
    installers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    transport: Transport = field(default_factory=Transport)
    security: Security = field(default_factory=Security)
    metrics: Metrics = field(default_factory=Metrics)
    log_level: str = "info"
    labels: tuple[tuple[str, str], ...] = ()  # this node's labels, for fleet selectors
    deprecations: tuple[str, ...] = ()  # old keys read under their new names: warn

    @property
    def state_dir(self) -> Path:
        return self.paths.node(self.paths.state_dir)

    @property
    def backup_root(self) -> Path:
        if self.paths.backup_dir is None:
            return self.state_dir / "backups"
        return self.paths.node(self.paths.backup_dir)

    @property
    def unit_file(self) -> str:
        return self.edgecore_unit_file or f"/etc/systemd/system/{self.edgecore_unit}"

    def installer(self, name: str) -> tuple[str, ...] | None:
        return dict(self.installers).get(name)

    def with_root(self, root: Path) -> Config:
        return replace(self, paths=replace(self.paths, root=root.resolve()))


def parse_config(data: Any) -> Config:
    check_document(data)
    data, deprecations = migrate(data)
    top = Section(data, "")
    node_name = top.get("node_name", str, None)
    if node_name is None:
        node_name = os.uname().nodename.lower()
    if not NAME_RE.fullmatch(node_name):
        raise ConfigError(f"node_name: {node_name!r} is not a DNS-1123 name")

    p = top.section("paths")
    paths = Paths(
        root=Path(p.get("root", str, "/")),
        edgecore_binary=p.path("edgecore_binary", Paths.edgecore_binary),
        edgecore_config=p.path("edgecore_config", Paths.edgecore_config),
        edgecore_db=p.path("edgecore_db", None),
        backup_dir=_backup_dir(p),
        keadm_lock=p.path("keadm_lock", Paths.keadm_lock),
        state_dir=p.path("state_dir", Paths.state_dir),
        run_dir=p.path("run_dir", Paths.run_dir),
    )
    p.done()

    s = top.section("service")
    manager = s.choice("manager", "systemd", tuple(SERVICE_MANAGERS))
    unit = s.get("unit", str, "edgecore.service")
    if not re.fullmatch(r"[A-Za-z0-9:_.@-]{1,240}\.service", unit):
        raise ConfigError(f"service.unit: {unit!r} is not a unit name like edgecore.service")
    unit_file = s.path("unit_file", None)
    preserve_unit = s.get("preserve_unit", bool, True)
    service_settings = _backend_settings(s, manager, SERVICE_MANAGERS, service_plugin)
    s.done()

    pol = top.section("policy")
    max_skip = pol.get("max_minor_skip", int, None)
    if max_skip is not None and max_skip < 0:
        raise ConfigError("policy.max_minor_skip: must be 0 or more")
    policy = VersionPolicy(pol.get("allow_downgrade", bool, False), max_skip)
    timeout = pol.integer("default_timeout_seconds", 300, 1, 86400)
    max_entries = pol.integer("max_state_entries", 5, 1, 100)
    pol.done()

    pc = top.section("precheck")
    precheck = Precheck(
        pc.number("cpu_max_percent", 80, 0, 100),
        pc.number("mem_max_percent", 80, 0, 100),
        pc.number("disk_max_percent", 80, 0, 100),
        pc.integer("reserve_bytes", Precheck.reserve_bytes, 0, 2**50),
    )
    pc.done()

    h = top.section("health")
    health = Health(
        h.number("grace_seconds", 30, 0, 3600),
        h.number("start_timeout_seconds", 60, 0, 3600),
        h.number("poll_interval_seconds", 1, 0.05, 60),
        h.get("metaserver_url", str, None),
    )
    h.done()

    b = top.section("backup")
    keep = b.integer("keep", 3, 1, 100)
    b.done()

    im = top.section("images")
    backend = im.choice("backend", "local", tuple(IMAGE_BACKENDS))
    others: dict[str, Any] = {}
    images = Images(
        backend,
        _backend_settings(im, backend, IMAGE_BACKENDS, image_plugin, others),
        im.get("default_repo", str, Images.default_repo),
        _strings(im, "allowed_registries", Images.allowed_registries),
        _strings(im, "allowed_repositories", ()),
        _credentials(im.section("credentials")),
        im.number("progress_interval_seconds", 5, 0.1, 3600),
        tuple(sorted(others.items())),
    )
    try:
        ref = parse_image(images.default_repo)
    except InvalidCommand as exc:
        raise ConfigError(f"images.default_repo: {exc.reason}") from None
    if ref.tag or ref.digest:
        # The version picks the tag; a digest here would pin every job to one build.
        raise ConfigError("images.default_repo: give the repository only, no tag or digest")
    im.done()

    ins = top.section("installers")
    installers = tuple((name, _installer(ins, name)) for name in sorted(ins.data))
    ins.done()

    t = top.section("transport")
    kind = t.choice("kind", "spool", tuple(TRANSPORTS))
    transport = Transport(
        kind,
        _backend_settings(t, kind, TRANSPORTS, transport_plugin),
        t.integer("max_message_bytes", 64 * 1024, 256, 16 * 1024 * 1024),
    )
    t.done()

    labels = top.get("labels", dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ConfigError("labels: expected a mapping of strings to strings")

    sec = top.section("security")
    security = Security(
        sec.get("require_signed_commands", bool, False),
        sec.path("trusted_keys_dir", Security.trusted_keys_dir),
        sec.number("max_clock_skew_seconds", 300, 0, 86400),
    )
    sec.done()

    me = top.section("metrics")
    metrics = Metrics(
        me.address("listen"),
        me.path("textfile", None),
        me.number("textfile_interval_seconds", 60, 1, 3600),
    )
    me.done()

    lg = top.section("logging")
    level = lg.choice("level", "info", ("debug", "info", "warning", "error"))
    lg.done()
    top.done()
    return Config(
        node_name=node_name,
        paths=paths,
        service_manager=manager,
        service_settings=service_settings,
        edgecore_unit=unit,
        edgecore_unit_file=unit_file,
        preserve_unit=preserve_unit,
        policy=policy,
        default_timeout_seconds=timeout,
        max_state_entries=max_entries,
        keep_backups=keep,
        precheck=precheck,
        health=health,
        images=images,
        installers=installers,
        transport=transport,
        security=security,
        metrics=metrics,
        log_level=level,
        labels=tuple(sorted(labels.items())),
        deprecations=deprecations,
    )


def _backend_settings(section: Section, chosen: str, table: dict[str, str],
                      plugin: Callable[[str], Configurable],
                      others: dict[str, Any] | None = None) -> Any:
    """Parse the chosen backend's sub-section, and check any other that is present.

    One file may carry several sub-sections and switch by name; a typo in one
    not chosen today is still an error today, not on the day it is chosen.
    Absent ones are not looked at, so their modules are not even imported.
    """
    for name in table:
        other = section.section(name) if name != chosen else None
        if other is not None and other.data:
            parsed = plugin(name).parse_settings(other)
            if others is not None:
                others[name] = parsed
    return plugin(chosen).parse_settings(section.section(chosen))


def _backup_dir(section: Section) -> str | None:
    value: str | None = section.path("backup_dir", None)
    if value is not None and Path(value).is_relative_to("/etc/kubeedge/backup"):
        raise ConfigError(
            f"{section.key('backup_dir')}: {value} is keadm's own backup directory; keadm "
            "overwrites it during an upgrade, so the agent's backups must live elsewhere "
            "(default: <state_dir>/backups)")
    return value


def _strings(section: Section, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = section.get(name, list, list(default))
    if not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{section.key(name)}: expected a list of non-empty strings")
    return tuple(value)


def _credentials(section: Section) -> tuple[RegistryAuth, ...]:
    out = []
    for registry in sorted(section.data):
        entry = section.section(registry)
        username = entry.get("username", str, None)
        password_file = entry.path("password_file", None)
        if not username or not password_file:
            raise ConfigError(f"{entry.where}: needs username and password_file")
        entry.done()
        out.append(RegistryAuth(registry, username, password_file))
    return tuple(out)


def check_daemon_files(config: Config) -> None:
    """What the daemon needs beyond the YAML: TLS material and signing keys.

    Run by `run` and `config validate` only, so that broken certificates never
    stop an operator's `status` or `rollback` on the node itself.
    """
    from agent.security.signing import load_public_keys  # noqa: PLC0415 (layering)

    transport_plugin(config.transport.kind).check_files(config.transport.settings)
    keys = Path(config.security.trusted_keys_dir)
    required = config.security.require_signed_commands
    if (required or keys.is_dir()) and not load_public_keys(keys) and required:
        raise ConfigError(f"security.trusted_keys_dir: no *.pub keys in {keys}, "
                          "but require_signed_commands is on")


def _installer(section: Section, name: str) -> tuple[str, ...]:
    argv = section.get(name, list, None)
    where = section.key(name)
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: installer names are DNS-1123 names")
    if name == "keadm":
        raise ConfigError(f"{where}: 'keadm' is the built-in installer; choose another name")
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError(f"{where}: expected a non-empty list of strings (an argv template)")
    if not argv[0].startswith(("/", "{keadm}")):
        raise ConfigError(f"{where}: the program must be an absolute path or {{keadm}}")
    for arg in argv:
        for part in arg.split("{")[1:]:
            placeholder = part.split("}", 1)[0]
            if placeholder not in PLACEHOLDERS:
                raise ConfigError(
                    f"{where}: unknown placeholder {{{placeholder}}}; "
                    f"known: {', '.join(sorted(PLACEHOLDERS))}"
                )
    return tuple(argv)


def load_config(path: Path, root: Path | None = None) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except ValueError as exc:  # an integer past Python's 4300-digit limit
        raise ConfigError(f"{path}: unreadable YAML: {str(exc)[:120]}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ConfigError(f"{path}: unreadable YAML: nested too deeply") from None
    config = parse_config(data)
    if root is not None:
        config = config.with_root(root)
    elif not config.paths.root.is_absolute():
        config = config.with_root(path.parent / config.paths.root)
    return config
