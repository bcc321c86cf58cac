"""The edge node as the steps see it: config, journal and adapters wired once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.adapters.docker_images import DockerImageBackend
from agent.adapters.edgecore import SHA_KEY, EdgecoreProbe
from agent.adapters.images import ImageBackend, LocalDirImageBackend
from agent.adapters.service import ProcessManager, ServiceManager, SystemctlManager
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


def build_node(config: Config, images: ImageBackend | None = None) -> Node:
    journal = Journal(config.state_dir / "journal.db")
    service: ServiceManager
    if config.service_manager == "systemd":
        service = SystemctlManager(config.edgecore_unit)
    else:
        paths = config.paths
        service = ProcessManager(
            paths.node(paths.edgecore_binary), paths.node(paths.edgecore_config),
            paths.node(paths.run_dir) / "edgecore.pid", paths.node("/var/log/edgecore.log"),
        )
    probe = EdgecoreProbe(config, service, lambda: journal.get_meta(RECORD_KEY),
                          lambda sha: journal.get_meta(SHA_KEY + sha))
    if images is None:
        if config.images.backend == "docker":
            images = DockerImageBackend(config.images)
        else:
            images = LocalDirImageBackend(config.paths.node(config.images.local_dir))
    return Node(config, journal, service, probe, images, JobLock(config.state_dir / "agent.lock"))
