"""The edge node as the steps see it: config, journal and adapters wired once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.adapters.edgecore import SHA_KEY, EdgecoreProbe
from agent.adapters.images import ImageBackend
from agent.adapters.service import ServiceManager
from agent.backends import image_plugin, service_plugin
from agent.config import Config
from agent.journal import Journal
from agent.locks import JobLock

RECORD_KEY = "edgecore_version"


@dataclass
class Node:
    config: Config
    journal: Journal
    service: ServiceManager
    probe: EdgecoreProbe
    images: ImageBackend
    lock: JobLock

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def backup_root(self) -> Path:
        return self.config.backup_root

    @property
    def keadm_marker(self) -> Path:
        return self.config.paths.node(self.config.paths.keadm_lock)

    def remember_edgecore(self, sha256: str, version: str) -> None:
        """Record which version an edgecore binary is, for detection by checksum."""
        self.journal.set_meta(SHA_KEY + sha256, version)

    def staging_dir(self, version: str) -> Path:
        return self.state_dir / "staging" / version

    def log_path(self, job_key: str) -> Path:
        return self.state_dir / "logs" / f"{job_key.replace('/', '_')}.log"

    def close(self) -> None:
        self.lock.release()
        self.journal.close()


def build_node(config: Config, images: ImageBackend | None = None,
               service: ServiceManager | None = None) -> Node:
    """Wire a node from the backend tables; ``images`` and ``service`` replace the
    configured ones (the in-process fakes of ``testkit.fakes``)."""
    journal = Journal(config.state_dir / "journal.db")
    if service is None:
        service = service_plugin(config.service_manager).from_config(
            config, config.service_settings)
    probe = EdgecoreProbe(config, service, lambda: journal.get_meta(RECORD_KEY),
                          lambda sha: journal.get_meta(SHA_KEY + sha))
    if images is None:
        images = image_plugin(config.images.backend).from_config(config, config.images.settings)
    return Node(config, journal, service, probe, images, JobLock(config.state_dir / "agent.lock"))
