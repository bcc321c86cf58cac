"""``edge-upgrade-ctl``'s configuration file (docs/controller.md#configuration).

The broker section is the agent's own (``transport.mqtt``'s keys and checks,
``agent.transport.mqtt.parse_mqtt``): a controller and its agents are
configured alike, and ``topic_prefix`` keeps its ``{node}`` level, which the
controller reads as a wildcard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.config_reader import Section, check_document, optional_path
from agent.errors import ConfigError
from agent.security.signing import KEY_ID_RE
from agent.transport.mqtt import MqttSettings, parse_mqtt

DEFAULT_CONFIG = Path("/etc/edge-upgrade-ctl/ctl.yaml")
GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class CtlSettings:
    mqtt: MqttSettings
    client_id: str = "cloud-controller"
    # "<group>": replicas split the status stream ($share/<group>/...). Off by
    # default: mosquitto does not check SUBSCRIBE against the ACL, so a node that
    # joins the group takes turns and its turns' reports are dropped
    # (docs/scaling.md); on a broker that checks it (EMQX), turn it on.
    shared_group: str = ""
    state_dir: Path = Path("/var/lib/edge-upgrade-ctl")
    # Retained presence arrives right after SUBSCRIBE, with no end marker: the
    # fleet view is complete once this long passes with no new presence.
    presence_settle_seconds: float = 1.0
    # How long the first connection may take before the command gives up.
    connect_timeout_seconds: float = 30.0
    # Added to timeoutSeconds before a silent node is Unknown: the agent's installer
    # deadline is timeoutSeconds too, and its report of that must not lose the race.
    timeout_grace_seconds: float = 30.0
    signing_key: Path | None = None
    signing_key_id: str = ""
    signing_ttl_seconds: int = 3600
    tick_seconds: float = 0.5

    @property
    def store_path(self) -> Path:
        return self.state_dir / "jobs.db"

    def topic(self, node: str, leaf: str) -> str:
        return self.mqtt.topic(node, leaf)

    def wildcard(self, leaf: str) -> str:
        return self.mqtt.topic("+", leaf)

    def node_of(self, topic: str, leaf: str) -> str | None:
        """The node a ``<prefix>/<leaf>`` topic names, or None for any other topic."""
        head, _, tail = self.mqtt.topic_prefix.partition("{node}")
        end = f"{tail}/{leaf}"
        if not topic.startswith(head) or not topic.endswith(end):
            return None
        node = topic[len(head):len(topic) - len(end)]
        return node if node and "/" not in node else None


def load_settings(path: Path) -> CtlSettings:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ConfigError(f"{path}: unreadable YAML: nested too deeply") from None
    except ValueError as exc:  # an integer past Python's 4300-digit limit
        raise ConfigError(f"{path}: unreadable YAML: {str(exc)[:120]}") from None
    check_document(data)
    return parse_settings(data)


# The controller's own identity, where the agent's defaults name the node's files.
TLS_DEFAULTS = {"ca_file": "/etc/edge-upgrade-ctl/tls/ca.crt",
                "cert_file": "/etc/edge-upgrade-ctl/tls/ctl.crt",
                "key_file": "/etc/edge-upgrade-ctl/tls/ctl.key"}


def parse_settings(data: object) -> CtlSettings:
    top = Section(data, "")
    mqtt_section = top.section("mqtt")
    mqtt_section.data = {**TLS_DEFAULTS, **mqtt_section.data}  # the caller's dict untouched
    mqtt = parse_mqtt(mqtt_section)
    if "{node}" not in mqtt.topic_prefix.split("/"):
        raise ConfigError("mqtt.topic_prefix: the controller needs a whole '{node}' level")
    c = top.section("controller")
    group = c.get("shared_group", str, CtlSettings.shared_group)
    if group and not GROUP_RE.fullmatch(group):
        raise ConfigError(f"controller.shared_group {group!r}: letters, digits, '-' and '_'")
    client_id = c.get("client_id", str, CtlSettings.client_id)
    if not GROUP_RE.fullmatch(client_id):
        raise ConfigError(f"controller.client_id {client_id!r}: letters, digits, '-' and '_'")
    state_dir = Path(c.path("state_dir", str(CtlSettings.state_dir)))
    settle = c.number("presence_settle_seconds", 1.0, 0.05, 60)
    tick = c.number("tick_seconds", 0.5, 0.01, 10)
    connect = c.number("connect_timeout_seconds", 30.0, 0.1, 3600)
    grace = c.number("timeout_grace_seconds", 30.0, 0, 3600)
    c.done()
    s = top.section("signing")
    key = optional_path(s, "key_file", None)
    key_id = s.get("key_id", str, "")
    ttl = s.integer("ttl_seconds", 3600, 60, 7 * 86400)
    s.done()
    top.done()
    if key and not key_id:
        raise ConfigError("signing.key_id is required with signing.key_file")
    if key_id and not KEY_ID_RE.fullmatch(key_id):
        raise ConfigError(f"signing.key_id {key_id[:80]!r}: 1-64 of letters, digits, '.', "
                          "'_' and '-'")
    return CtlSettings(
        mqtt=mqtt, client_id=client_id, shared_group=group, state_dir=state_dir,
        presence_settle_seconds=settle, tick_seconds=tick, connect_timeout_seconds=connect,
        timeout_grace_seconds=grace,
        signing_key=Path(key) if key else None, signing_key_id=key_id,
        signing_ttl_seconds=ttl)
