"""agent/config.py: defaults, key-naming errors, loading, sandbox roots, `config validate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.adapters.containerd_images import ContainerdSettings
from agent.adapters.docker_images import DockerSettings
from agent.adapters.images import LocalSettings
from agent.config import (
    Config,
    Health,
    Images,
    Paths,
    Precheck,
    Transport,
    load_config,
    parse_config,
)
from agent.errors import ConfigError
from agent.transport.spool import SpoolSettings
from agent.versions import NAME_RE, VersionPolicy

REPO = Path(__file__).resolve().parents[1]
NODE = "edge-1"


def parse(**data: Any) -> Config:
    return parse_config({"node_name": NODE, **data})


# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    config = parse()
    assert config.node_name == NODE
    assert config.paths == Paths()
    assert config.paths.root == Path("/")
    assert config.paths.edgecore_binary == "/usr/local/bin/edgecore"
    assert config.paths.edgecore_config == "/etc/kubeedge/config/edgecore.yaml"
    assert config.paths.edgecore_db is None
    assert config.paths.backup_dir is None
    assert config.backup_root == Path("/var/lib/edge-upgrade-agent/backups")
    assert config.paths.keadm_lock == "/etc/kubeedge/idempotency_record"
    assert config.service_manager == "systemd"
    assert config.edgecore_unit == "edgecore.service"
    assert config.policy == VersionPolicy(allow_downgrade=False, max_minor_skip=None)
    assert config.default_timeout_seconds == 300
    assert config.max_state_entries == 5
    assert config.keep_backups == 3
    assert config.precheck == Precheck()
    assert config.precheck.cpu_max_percent == 80.0
    assert config.health == Health()
    assert config.images == Images()
    assert config.images.default_repo == "kubeedge/installation-package"
    assert config.installers == ()
    assert config.installer("keadm") is None
    assert config.transport == Transport()
    assert config.transport.max_message_bytes == 64 * 1024
    assert config.log_level == "info"
    assert config.state_dir == Path("/var/lib/edge-upgrade-agent")


@pytest.mark.parametrize("empty", [None, {}])
def test_node_name_defaults_to_hostname(empty: Any) -> None:
    hostname = os.uname().nodename.lower()
    if not NAME_RE.match(hostname):
        with pytest.raises(ConfigError, match="node_name"):
            parse_config(empty)
    else:
        assert parse_config(empty).node_name == hostname


def test_full_config() -> None:
    config = parse(
        paths={
            "root": "/srv/sandbox",
            "edgecore_binary": "/opt/edgecore",
            "edgecore_db": "/var/lib/kubeedge/other.db",
            "backup_dir": "/var/backups/kubeedge",
            "state_dir": "/var/lib/eua",
        },
        service={"manager": "process", "unit": "edgecore-2.service"},
        policy={"allow_downgrade": True, "max_minor_skip": 1, "default_timeout_seconds": 900,
                "max_state_entries": 10},
        precheck={"cpu_max_percent": 95, "mem_max_percent": 90.5, "disk_max_percent": 0,
                  "reserve_bytes": 0},
        health={"grace_seconds": 5, "start_timeout_seconds": 10, "poll_interval_seconds": 0.1,
                "metaserver_url": "http://127.0.0.1:10550"},
        backup={"keep": 7},
        images={"backend": "local", "default_repo": "registry.local:5000/kubeedge/pkg",
                "local": {"dir": "/srv/images"}, "docker": {"host": "tcp://ignored:2375"}},
        installers={
            "zeta": ["{keadm}", "upgrade", "edge", "--toVersion", "{to_version}"],
            "alpha": ["/usr/local/bin/install.sh", "--from={from_version}", "--image={image}",
                      "{config}", "{upgrade_id}", "{history_id}"],
        },
        transport={"kind": "spool", "max_message_bytes": 256,
                   "spool": {"dir": "/srv/spool", "outbox_dir": "/srv/out",
                             "poll_interval_seconds": 0.01}},
        labels={"site": "north"},
        logging={"level": "debug"},
    )
    assert config.paths.root == Path("/srv/sandbox")
    assert config.paths.edgecore_binary == "/opt/edgecore"
    assert config.paths.edgecore_db == "/var/lib/kubeedge/other.db"
    assert config.state_dir == Path("/srv/sandbox/var/lib/eua")
    assert config.service_manager == "process"
    assert config.edgecore_unit == "edgecore-2.service"
    assert config.policy == VersionPolicy(allow_downgrade=True, max_minor_skip=1)
    assert config.default_timeout_seconds == 900
    assert config.max_state_entries == 10
    assert config.precheck == Precheck(95.0, 90.5, 0.0, 0)
    assert config.health == Health(5.0, 10.0, 0.1, "http://127.0.0.1:10550")
    assert config.keep_backups == 7
    assert config.images == Images(
        "local", LocalSettings("/srv/images"), "registry.local:5000/kubeedge/pkg",
        others=(("docker", DockerSettings("tcp://ignored:2375")),))
    assert config.images.settings_for("docker") == DockerSettings("tcp://ignored:2375")
    assert config.images.settings_for("containerd") == ContainerdSettings()
    assert [name for name, _ in config.installers] == ["alpha", "zeta"]
    assert config.installer("zeta") == ("{keadm}", "upgrade", "edge", "--toVersion",
                                        "{to_version}")
    assert config.installer("missing") is None
    assert config.transport == Transport("spool", SpoolSettings("/srv/spool", "/srv/out", 0.01),
                                         256)
    assert config.labels == (("site", "north"),)
    assert config.deprecations == ()
    assert config.log_level == "debug"


def test_null_sections_and_values_mean_defaults() -> None:
    config = parse(paths=None, policy={"max_minor_skip": None}, precheck={"cpu_max_percent": None})
    assert config.paths == Paths()
    assert config.policy.max_minor_skip is None
    assert config.precheck.cpu_max_percent == 80.0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"node_name": "Edge_1"}, "node_name: 'Edge_1' is not a DNS-1123 name"),
        ({"node_name": 5}, "node_name: expected str, got 5"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"paths": {"bogus": 1}}, "paths.bogus: unknown key"),
        ({"paths": "x"}, "paths: expected a mapping"),
        ({"paths": {"backup_dir": "etc/kubeedge/backup"}},
         "paths.backup_dir: 'etc/kubeedge/backup' must be an absolute path"),
        ({"paths": {"edgecore_binary": "edgecore"}}, "paths.edgecore_binary: 'edgecore' must be"),
        ({"paths": {"edgecore_db": "./edgecore.db"}}, "paths.edgecore_db: './edgecore.db' must"),
        ({"paths": {"state_dir": 7}}, "paths.state_dir: expected str, got 7"),
        ({"service": {"manager": "upstart"}},
         "service.manager: 'upstart' is not one of systemd, process"),
        ({"service": {"unit": ["a"]}}, "service.unit: expected str"),
        ({"service": {"bogus": 1}}, "service.bogus: unknown key"),
        ({"policy": {"max_minor_skip": -1}}, "policy.max_minor_skip: must be 0 or more"),
        ({"policy": {"max_minor_skip": "1"}}, "policy.max_minor_skip: expected int, got '1'"),
        ({"policy": {"max_minor_skip": 1.5}}, "policy.max_minor_skip: expected int"),
        ({"policy": {"max_minor_skip": True}}, "policy.max_minor_skip: expected a number"),
        ({"policy": {"allow_downgrade": "yes"}}, "policy.allow_downgrade: expected bool"),
        ({"policy": {"default_timeout_seconds": 0}},
         "policy.default_timeout_seconds: 0 is outside 1..86400"),
        ({"policy": {"max_state_entries": 101}}, "policy.max_state_entries: 101 is outside"),
        ({"precheck": {"cpu_max_percent": 120}}, "precheck.cpu_max_percent: 120 is outside 0..100"),
        ({"precheck": {"mem_max_percent": -1}}, "precheck.mem_max_percent: -1 is outside 0..100"),
        ({"precheck": {"disk_max_percent": float("nan")}}, "precheck.disk_max_percent: nan is"),
        ({"precheck": {"disk_max_percent": "80%"}},
         "precheck.disk_max_percent: expected int/float"),
        ({"precheck": {"reserve_bytes": False}}, "precheck.reserve_bytes: expected a number"),
        ({"health": {"poll_interval_seconds": 0}}, "health.poll_interval_seconds: 0 is outside"),
        ({"health": {"grace_seconds": float("inf")}}, "health.grace_seconds: inf is outside"),
        ({"health": {"metaserver_url": 1}}, "health.metaserver_url: expected str"),
        ({"backup": {"keep": 0}}, "backup.keep: 0 is outside 1..100"),
        ({"backup": {"dir": "/x"}}, "backup.dir: unknown key"),
        ({"images": {"backend": "podman"}}, "images.backend: 'podman' is not one of local"),
        ({"images": {"default_repo": "Kubeedge Pkg"}}, "images.default_repo: bad image reference"),
        ({"images": {"local": {"dir": "images"}}},
         "images.local.dir: 'images' must be an absolute"),
        ({"images": {"local": {"root": "/x"}}}, "images.local.root: unknown key"),
        ({"images": {"docker": "unix:///x"}}, "images.docker: expected a mapping"),
        ({"images": {"backend": "docker", "docker": {"host": "http://x"}}},
         "images.docker.host: 'http://x' is not a docker URL"),
        ({"service": {"manager": "process", "process": {"log_file": "x.log"}}},
         "service.process.log_file: 'x.log' must be an absolute"),
        ({"installers": ["/bin/x"]}, "installers: expected a mapping"),
        ({"installers": {"custom": "/bin/install"}}, "installers.custom: expected list"),
        ({"installers": {"custom": []}}, "installers.custom: expected a non-empty list of strings"),
        ({"installers": {"custom": ["/bin/install", 3]}},
         "installers.custom: expected a non-empty"),
        ({"installers": {"custom": ["bin/install"]}},
         "installers.custom: the program must be an absolute path or {keadm}"),
        ({"installers": {"custom": ["install.sh", "{keadm}"]}},
         "installers.custom: the program must be an absolute path"),
        ({"installers": {"custom": ["/bin/install", "--v={version}"]}},
         "installers.custom: unknown placeholder {version}"),
        ({"installers": {"custom": ["/bin/install", "{to_version.__class__}"]}},
         "installers.custom: unknown placeholder {to_version.__class__}"),
        ({"installers": {"Custom_1": ["/bin/install"]}},
         "installers.Custom_1: installer names are DNS-1123 names"),
        ({"transport": {"kind": "carrier-pigeon"}},
         "transport.kind: 'carrier-pigeon' is not one of spool, mqtt"),
        ({"transport": {"spool": {"dir": "spool"}}},
         "transport.spool.dir: 'spool' must be an absolute"),
        ({"transport": {"mqtt": {"labels": {"a": 1}}}}, "labels: expected a mapping of strings"),
        ({"transport": {"max_message_bytes": 10}},
         "transport.max_message_bytes: 10 is outside 256..16777216"),
        ({"logging": {"level": "trace"}}, "logging.level: 'trace' is not one of"),
        ({"logging": {"format": "json"}}, "logging.format: unknown key"),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"node_name": NODE, **data})
    assert message in info.value.reason
    assert info.value.exit_code == 2


@pytest.mark.parametrize("data", [[], "node_name: x", 42])
def test_top_level_must_be_a_mapping(data: Any) -> None:
    with pytest.raises(ConfigError, match="config: expected a mapping"):
        parse_config(data)


def test_unknown_keys_reported_first_alphabetically() -> None:
    with pytest.raises(ConfigError, match=r"^aaa: unknown key$"):
        parse(zzz=1, aaa=2)


def test_non_string_unknown_key_is_config_error() -> None:
    with pytest.raises(ConfigError, match="key 2 is not a string"):
        parse_config({"node_name": NODE, "bogus": 1, 2: 3})


def test_non_string_installer_name_is_config_error() -> None:
    with pytest.raises(ConfigError, match="installers"):
        parse_config({"node_name": NODE, "installers": {1: ["/bin/install"]}})


# --------------------------------------------------------------------------- load_config


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_load_config(tmp_path: Path) -> None:
    f = write(tmp_path / "agent.yaml", {"node_name": NODE, "backup": {"keep": 4}})
    config = load_config(f)
    assert config.node_name == NODE
    assert config.keep_backups == 4
    assert config.paths.root == Path("/")


def test_load_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in info.value.reason
    assert "cannot read config" in info.value.reason


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config") as info:
        load_config(tmp_path)
    assert str(tmp_path) in info.value.reason


@pytest.mark.parametrize("text", ["node_name: [unclosed\n", "a: b: c\n", "\t- x\n  y: [\n"])
def test_load_config_bad_yaml(tmp_path: Path, text: str) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.reason.startswith(f"{f}: not valid YAML")


def test_load_config_semantic_error_names_key(tmp_path: Path) -> None:
    f = write(tmp_path / "agent.yaml", {"node_name": NODE, "precheck": {"cpu_max_percent": 120}})
    with pytest.raises(ConfigError, match=r"precheck\.cpu_max_percent: 120 is outside"):
        load_config(f)


def test_load_config_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_bytes(b"node_name: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert str(f) in info.value.reason


def test_load_config_relative_root_is_relative_to_the_file(tmp_path: Path) -> None:
    f = write(tmp_path / "agent.yaml", {"node_name": NODE, "paths": {"root": "sandbox"}})
    config = load_config(f)
    assert config.paths.root == (tmp_path / "sandbox").resolve()
    assert config.paths.root.is_absolute()


def test_load_config_root_argument_overrides(tmp_path: Path) -> None:
    f = write(tmp_path / "agent.yaml", {"node_name": NODE, "paths": {"root": "/srv/other"}})
    assert load_config(f).paths.root == Path("/srv/other")
    config = load_config(f, root=tmp_path / "r")
    assert config.paths.root == (tmp_path / "r").resolve()


# --------------------------------------------------------------------------- roots


def test_paths_node_maps_under_root(tmp_path: Path) -> None:
    assert Paths().node("/usr/local/bin/edgecore") == Path("/usr/local/bin/edgecore")
    config = parse().with_root(tmp_path)
    assert config.paths.root == tmp_path.resolve()
    binary = config.paths.node(config.paths.edgecore_binary)
    assert binary == tmp_path.resolve() / "usr" / "local" / "bin" / "edgecore"
    assert config.paths.node("/usr/local/bin/edgecore") == binary
    assert config.state_dir == tmp_path.resolve() / "var/lib/edge-upgrade-agent"
    # with_root returns a new config; the original is untouched
    assert parse().paths.root == Path("/")


def test_with_root_resolves_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse().with_root(Path("sandbox"))
    assert config.paths.root == tmp_path.resolve() / "sandbox"
    assert config.paths.node("/etc/kubeedge/config/edgecore.yaml") == (
        tmp_path.resolve() / "sandbox/etc/kubeedge/config/edgecore.yaml"
    )


# --------------------------------------------------------------------------- repo config


@pytest.mark.parametrize("name", ["agent.yaml"])
def test_repo_config_validates(name: str) -> None:
    path = REPO / "config" / name
    if not path.is_file():
        pytest.skip(f"config/{name} is not in the repository")
    config = load_config(path)
    assert NAME_RE.match(config.node_name)


# --------------------------------------------------------------------------- CLI


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: val for k, val in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def test_cli_config_validate_good(tmp_path: Path) -> None:
    f = write(tmp_path / "agent.yaml", {"node_name": NODE, "policy": {"max_minor_skip": 1}})
    result = cli("--config", str(f), "config", "validate")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{f}: valid (node {NODE})" in result.stdout
    result = cli("--output", "json", "config", "validate", str(f))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == {"valid": True, "nodeName": NODE, "deprecations": []}


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"node_name": NODE, "policy": {"max_minor_skip": -1}}, "policy.max_minor_skip"),
        ({"node_name": NODE, "paths": {"bogus": "/x"}}, "paths.bogus: unknown key"),
    ],
)
def test_cli_config_validate_bad(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    f = write(tmp_path / "agent.yaml", data)
    result = cli("--config", str(f), "config", "validate")
    assert result.returncode == 2
    assert key in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_cli_config_validate_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = cli("config", "validate", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stdout + result.stderr


# -- keys that moved into backend sub-sections ----------------------------------

OLD_LAYOUT: dict[str, Any] = {
    "images": {"backend": "docker", "local_dir": "/srv/images",
               "docker_host": "tcp://engine:2375", "docker_config": ""},
    "transport": {"kind": "mqtt", "spool_dir": "/srv/spool", "outbox_dir": "/srv/out",
                  "poll_interval_seconds": 0.25,
                  "mqtt": {"host": "broker", "labels": {"site": "north"}}},
}
NEW_LAYOUT: dict[str, Any] = {
    "images": {"backend": "docker", "local": {"dir": "/srv/images"},
               "docker": {"host": "tcp://engine:2375", "config": ""}},
    "transport": {"kind": "mqtt", "mqtt": {"host": "broker"},
                  "spool": {"dir": "/srv/spool", "outbox_dir": "/srv/out",
                            "poll_interval_seconds": 0.25}},
    "labels": {"site": "north"},
}


def test_old_layout_still_loads_and_names_each_new_key() -> None:
    old, new = parse(**OLD_LAYOUT), parse(**NEW_LAYOUT)
    assert new.deprecations == ()
    assert old == replace(new, deprecations=old.deprecations)
    assert old.images.settings.host == "tcp://engine:2375" and old.images.settings.config is None
    assert old.deprecations == (
        "images.local_dir is now images.local.dir; rename it (the old key still works)",
        "images.docker_host is now images.docker.host; rename it (the old key still works)",
        "images.docker_config is now images.docker.config; rename it (the old key still works)",
        "transport.spool_dir is now transport.spool.dir; rename it (the old key still works)",
        "transport.outbox_dir is now transport.spool.outbox_dir; rename it "
        "(the old key still works)",
        "transport.poll_interval_seconds is now transport.spool.poll_interval_seconds; rename "
        "it (the old key still works)",
        "transport.mqtt.labels is now labels; rename it (the old key still works)",
    )


def test_old_and_new_key_together_is_an_error() -> None:
    with pytest.raises(ConfigError) as exc:
        parse(images={"docker_host": "tcp://a:1", "docker": {"host": "tcp://b:2"}})
    assert exc.value.reason == ("images.docker_host: moved to images.docker.host, which is "
                                "also set; keep only the new key")


def test_config_validate_warns_about_old_keys(tmp_path: Path) -> None:
    f = write(tmp_path / "agent.yaml", {"node_name": NODE, "images": {"local_dir": "/srv/i"}})
    result = cli("config", "validate", str(f))
    assert result.returncode == 0, result.stderr
    assert f"{f}: warning: images.local_dir is now images.local.dir" in result.stdout


def test_every_backend_in_the_tables_parses_its_defaults() -> None:
    """Each name in the tables resolves lazily to a class with the plugin calls."""
    from agent.backends import IMAGE_BACKENDS, SERVICE_MANAGERS, TRANSPORTS

    for name in IMAGE_BACKENDS:
        assert parse(images={"backend": name}).images.backend == name
    for name in SERVICE_MANAGERS:
        assert parse(service={"manager": name}).service_manager == name
    for name in TRANSPORTS:
        assert parse(transport={"kind": name}).transport.kind == name


def test_backends_not_chosen_are_never_imported() -> None:
    """The tables import lazily: a spool node with unpacked images loads neither
    aiomqtt nor the docker SDK, even while it builds its node."""
    code = (
        "import sys\n"
        "from agent.config import parse_config\n"
        "from agent.daemon import Daemon\n"
        "parse_config({'node_name': 'n', 'transport': {'kind': 'spool'}})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('aiomqtt', 'docker', 'paho'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
