"""Name → implementation tables for the agent's pluggable parts (uvicorn's pattern).

Three parts are chosen by name in the config: the image backend
(``images.backend``), the service manager (``service.manager``) and the
transport (``transport.kind``). Each name maps to a ``"module:Class"`` string,
imported only when that name is chosen, so a spool node never loads aiomqtt
and a node with unpacked images never loads the docker SDK.

Adding one is a one-module change plus one line in a table below. The class
provides, beside the part's Protocol (``ImageBackend``, ``ServiceManager``,
``Transport``):

- ``parse_settings(section)``: its own options, from the config sub-section
  named after it (``images.docker``, ``transport.spool`` …), as a frozen
  dataclass; errors name the key, as every config error does;
- ``from_config(config, settings, …)``: the instance the node uses.

``docs/architecture.md`` ("Adding an image backend") walks through one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.adapters.images import ImageBackend
    from agent.adapters.service import ServiceManager
    from agent.config import Config
    from agent.config_reader import Section
    from agent.transport.base import Presence, Transport

IMAGE_BACKENDS = {
    "local": "agent.adapters.images:LocalDirImageBackend",
    "docker": "agent.adapters.docker_images:DockerImageBackend",
    "containerd": "agent.adapters.containerd_images:ContainerdImageBackend",
    "auto": "agent.adapters.auto_images:AutoImageBackend",  # edgecore's runtime decides
}
SERVICE_MANAGERS = {
    "systemd": "agent.adapters.service:SystemctlManager",
    "process": "agent.adapters.service:ProcessManager",
}
TRANSPORTS = {
    "spool": "agent.transport.spool:SpoolTransport",
    "mqtt": "agent.transport.mqtt:MqttTransport",
}


class Configurable(Protocol):
    @staticmethod
    def parse_settings(section: Section) -> Any:
        """The backend's own sub-section, as a frozen dataclass (every key consumed)."""


class ImagePlugin(Configurable, Protocol):
    @classmethod
    def from_config(cls, config: Config, settings: Any) -> ImageBackend: ...


class ServicePlugin(Configurable, Protocol):
    @classmethod
    def from_config(cls, config: Config, settings: Any) -> ServiceManager: ...


class TransportPlugin(Configurable, Protocol):
    @classmethod
    def from_config(cls, config: Config, settings: Any, presence: Presence) -> Transport: ...

    @staticmethod
    def check_files(settings: Any) -> None:
        """What the daemon needs beyond the YAML (TLS files): ConfigError if unusable."""


def _load(table: dict[str, str], name: str) -> Any:
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def image_plugin(name: str) -> ImagePlugin:
    plugin: ImagePlugin = _load(IMAGE_BACKENDS, name)
    return plugin


def service_plugin(name: str) -> ServicePlugin:
    plugin: ServicePlugin = _load(SERVICE_MANAGERS, name)
    return plugin


def transport_plugin(name: str) -> TransportPlugin:
    plugin: TransportPlugin = _load(TRANSPORTS, name)
    return plugin
