"""``edge-upgrade-ctl``'s configuration file (docs/configuration.md#the-controller).

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

    def node_of(self, topic: str) -> str | None:
        """The node a topic names (``{node}`` in topic_prefix), or None for other topics."""
        head, _, tail = self.mqtt.topic_prefix.partition("{node}")
        if not topic.startswith(head):
            return None
        node, _, rest = topic[len(head):].partition("/")
        return node if node and rest.startswith(tail.lstrip("/")) else None


def load_settings(path: Path) -> CtlSettings:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    check_document(data)
    return parse_settings(data)


def parse_settings(data: object) -> CtlSettings:
    top = Section(data, "")
    mqtt_section = top.section("mqtt")
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
    c.done()
    s = top.section("signing")
    key = optional_path(s, "key_file", None)
    key_id = s.get("key_id", str, "")
    ttl = s.integer("ttl_seconds", 3600, 60, 7 * 86400)
    s.done()
    top.done()
    if key and not key_id:
        raise ConfigError("signing.key_id is required with signing.key_file")
    return CtlSettings(
        mqtt=mqtt, client_id=client_id, shared_group=group, state_dir=state_dir,
        presence_settle_seconds=settle, tick_seconds=tick,
        signing_key=Path(key) if key else None, signing_key_id=key_id,
        signing_ttl_seconds=ttl)
