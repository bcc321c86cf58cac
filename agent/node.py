"""The edge node as the steps see it: config, journal and adapters wired once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.adapters.docker_images import DockerImageBackend
from agent.adapters.edgecore import EdgecoreProbe
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
        return self.config.paths.node(self.config.paths.backup_dir)

    @property
    def keadm_marker(self) -> Path:
        return self.config.paths.node(self.config.paths.keadm_lock)

    def staging_dir(self, version: str) -> Path:
        return self.state_dir / "staging" / version

    def log_path(self, job_key: str) -> Path:
        return self.state_dir / "logs" / f"{job_key.replace('/', '_')}.log"

    def close(self) -> None:
        self.lock.release()
        self.journal.close()


def build_node(config: Config, images: ImageBackend | None = None) -> Node:
    journal = Journal(config.state_dir / "journal.db")
    probe = EdgecoreProbe(config, lambda: journal.get_meta(RECORD_KEY))
    service: ServiceManager
    if config.service_manager == "systemd":
        service = SystemctlManager(config.edgecore_unit)
    else:
        files = probe.files()
        run = config.paths.node(config.paths.run_dir)
        service = ProcessManager(
            files.binary, files.config, run / "edgecore.pid",
            config.paths.node("/var/log/edgecore.log"),
        )
    if images is None:
        if config.images.backend == "docker":
            images = DockerImageBackend(config.images)
        else:
            images = LocalDirImageBackend(config.paths.node(config.images.local_dir))
    return Node(config, journal, service, probe, images, JobLock(config.state_dir / "agent.lock"))
