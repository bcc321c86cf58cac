"""``images.backend: auto``: the image backend of the runtime edgecore itself uses.

keadm pulls the installation package through edgecore's container runtime,
so the agent must put the package where that runtime looks. edgecore.yaml
names the runtime's CRI endpoint:

- v1.12/v1.13: ``modules.edged.remoteRuntimeEndpoint`` (with
  ``containerRuntime: docker`` for the built-in dockershim);
- v1.19+: ``modules.edged.tailoredKubeletConfig.containerRuntimeEndpoint``,
  default ``unix:///run/containerd/containerd.sock``.

A containerd socket picks the containerd backend (with that socket); docker,
dockershim or cri-dockerd pick the docker backend. Any other runtime (CRI-O,
iSulad) is refused by name: say which backend to use instead. Read when the
node is built, so a node moved from dockershim to containerd follows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from agent.adapters.images import ImageBackend
from agent.config_reader import Section
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.config import Config

V119_DEFAULT = "unix:///run/containerd/containerd.sock"


@dataclasses.dataclass(frozen=True)
class AutoSettings:
    """``images.auto``: nothing; the docker and containerd sub-sections apply as chosen."""


def runtime_endpoint(edgecore_yaml: Path) -> tuple[str, str]:
    """(endpoint, where it was read) from edgecore.yaml."""
    try:
        data = yaml.safe_load(edgecore_yaml.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"images.backend: auto needs {edgecore_yaml}: {exc}") from None
    edged = (data.get("modules") or {}).get("edged") or {} if isinstance(data, dict) else {}
    if not isinstance(edged, dict):
        edged = {}
    tailored = edged.get("tailoredKubeletConfig")
    if isinstance(tailored, dict):
        where = "modules.edged.tailoredKubeletConfig.containerRuntimeEndpoint"
        return str(tailored.get("containerRuntimeEndpoint") or V119_DEFAULT), where
    if edged.get("containerRuntime") == "docker":
        return "docker", "modules.edged.containerRuntime"
    endpoint = edged.get("remoteRuntimeEndpoint")
    if endpoint:
        return str(endpoint), "modules.edged.remoteRuntimeEndpoint"
    return V119_DEFAULT, "(no endpoint set: edgecore's default)"


def choose(endpoint: str) -> tuple[str, str | None]:
    """(backend name, containerd socket path or None) for a CRI endpoint."""
    path = endpoint.removeprefix("unix://")
    name = Path(path).name
    if endpoint == "docker" or name in ("dockershim.sock", "cri-dockerd.sock", "docker.sock"):
        return "docker", None
    if "containerd" in name:
        return "containerd", path
    raise ConfigError(f"images.backend: auto cannot pull for the runtime at {endpoint} "
                      "(only containerd and docker are supported); set images.backend")


class AutoImageBackend:
    @staticmethod
    def parse_settings(section: Section) -> AutoSettings:
        section.done()
        return AutoSettings()

    @classmethod
    def from_config(cls, config: Config, settings: AutoSettings) -> ImageBackend:
        from agent.backends import image_plugin  # noqa: PLC0415 (the table imports us)

        endpoint, _ = runtime_endpoint(config.paths.node(config.paths.edgecore_config))
        name, socket = choose(endpoint)
        chosen: Any = config.images.settings_for(name)
        if socket is not None:
            chosen = dataclasses.replace(chosen, address=socket)
        return image_plugin(name).from_config(config, chosen)
