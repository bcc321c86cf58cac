"""The docker image backend against a real dockerd and a real registry with htpasswd."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Sandbox

from agent.adapters.docker_images import DockerImageBackend, DockerSettings
from agent.adapters.images import EDGECORE, KEADM, verify_digest
from agent.config import Images, RegistryAuth, parse_config
from agent.errors import FatalError, InvalidCommand, TransientError
from agent.messages.commands import Operation, build_command
from agent.retry import retry_transient
from agent.versions import parse_image
from testkit.dockerenv import (
    Dockerd,
    Registry,
    build_package_image,
    dockerd_and_registry,
    push,
    remove_image,
)
from testkit.standins import write_edgecore, write_keadm

USER, PASSWORD = "edge", "s3cret"
REPO = "kubeedge/installation-package"


class Env:
    def __init__(self, dockerd: Dockerd, registry: Registry, workdir: Path) -> None:
        self.dockerd = dockerd
        self.registry = registry
        self.workdir = workdir
        self.client = dockerd.client()
        self.digests: dict[str, str] = {}
        self.password_file = workdir / "registry-password"
        self.password_file.write_text(PASSWORD + "\n")
        self.keadm = write_keadm(workdir / "bin/keadm", "v1.13.0")
        self.edgecore = write_edgecore(workdir / "bin/edgecore", "v1.13.0")

    def ref(self, version: str = "v1.13.0", repo: str = REPO) -> str:
        return f"{self.registry.address}/{repo}:{version}"

    def publish(self, version: str, repo: str = REPO, **kw: Any) -> str:
        ref = self.ref(version, repo)
        links = kw.get("symlinks") or {}
        files = {k: v for k, v in {KEADM: self.keadm, EDGECORE: self.edgecore}.items()
                 if k not in links}
        build_package_image(self.client, ref, files, **kw)
        self.digests[ref] = push(self.client, ref, USER, PASSWORD)
        remove_image(self.client, ref)  # so every test really pulls
        return ref

    def images(self, **overrides: Any) -> Images:
        base: dict[str, Any] = dict(
            backend="docker", settings=DockerSettings(self.dockerd.host, None),
            allowed_registries=(self.registry.address,),
            credentials=(RegistryAuth(self.registry.address, USER, str(self.password_file)),),
            progress_interval_seconds=0.1)
        base.update(overrides)
        return Images(**base)

    def backend(self, docker_config: str | None = None, **overrides: Any) -> DockerImageBackend:
        images = self.images(**overrides)
        return DockerImageBackend(images, DockerSettings(self.dockerd.host, docker_config))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("docker")
    with dockerd_and_registry(work, {USER: PASSWORD}) as (dockerd, registry):
        e = Env(dockerd, registry, work)
        e.publish("v1.13.0")
        e.publish("v1.13.0", repo="kubeedge/crafted", symlinks={KEADM: "/etc/passwd"})
        yield e


def ref_of(text: str) -> Any:
    return parse_image(text)


async def test_pull_with_config_credentials_and_extract(env: Env, tmp_path: Path) -> None:
    ref = ref_of(env.ref())
    remove_image(env.client, str(ref))
    progress: list[str] = []
    info = await env.backend().pull(ref, time.monotonic() + 60, progress.append)
    assert info.digest == env.digests[str(ref)] and info.present_locally
    verify_digest(info, env.digests[str(ref)])
    files = await env.backend().extract(ref, [KEADM, EDGECORE], tmp_path / "out")
    assert files[KEADM].read_bytes() == env.keadm.read_bytes()
    assert files[KEADM].stat().st_mode & 0o777 == 0o755
    assert env.client.containers.list(all=True) == []  # the helper container is gone


async def test_pull_with_docker_config_json(env: Env, tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    cfg.write_text(json.dumps({"auths": {env.registry.address: {"auth": token}}}))
    ref = ref_of(env.ref())
    remove_image(env.client, str(ref))
    backend = env.backend(credentials=(), docker_config=str(cfg))
    info = await backend.pull(ref, time.monotonic() + 60, lambda _: None)
    assert info.digest == env.digests[str(ref)]


async def test_wrong_password_is_fatal_at_once(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad-password"
    bad.write_text("wrong")
    backend = env.backend(credentials=(RegistryAuth(env.registry.address, USER, str(bad)),))
    ref = ref_of(env.ref())
    remove_image(env.client, str(ref))
    calls: list[int] = []

    async def pull() -> Any:
        calls.append(1)
        return await backend.pull(ref, time.monotonic() + 60, lambda _: None)

    with pytest.raises(FatalError, match="refused the credentials") as info:
        await retry_transient("pull", pull, max_wait=0.01)
    assert len(calls) == 1  # no retry storm against a registry that said no
    assert "wrong" not in str(info.value) and PASSWORD not in str(info.value)


async def test_missing_tag_is_fatal(env: Env) -> None:
    with pytest.raises(FatalError, match="not found"):
        await env.backend().pull(ref_of(env.ref("v9.9.9")), time.monotonic() + 60,
                                 lambda _: None)


def test_registry_outside_the_allow_list_is_rejected_before_any_call(env: Env) -> None:
    config = parse_config({"node_name": "node-1",
                           "images": {"allowed_registries": [env.registry.address]}})
    with pytest.raises(InvalidCommand, match="not allowed"):
        build_command(config, operation=Operation.UPGRADE, job_name="j", version="v1.13.0",
                      image="evil.example.com:5000/kubeedge/installation-package")
    before = env.registry.request_log()
    with pytest.raises(InvalidCommand):
        build_command(config, operation=Operation.UPGRADE, job_name="j", version="v1.13.0",
                      image="kubeedge/installation-package")  # docker.io, not listed
    assert env.registry.request_log() == before


async def test_digest_mismatch_names_both_digests(env: Env) -> None:
    ref = ref_of(env.ref())
    info = await env.backend().pull(ref, time.monotonic() + 60, lambda _: None)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(FatalError) as exc:
        verify_digest(info, wrong)
    assert wrong in exc.value.reason and info.digest in exc.value.reason


async def test_registry_killed_mid_pull_then_back_within_the_deadline(env: Env) -> None:
    ref = ref_of(env.publish("v1.13.1", pad_bytes=64 * 1024 * 1024))
    killed: list[str] = []
    restart = threading.Timer(1.5, env.registry.start)

    def on_progress(message: str) -> None:
        if not killed:  # the first progress event: bytes are flowing, now pull the plug
            killed.append(message)
            env.registry.kill()
            restart.start()

    deadline = time.monotonic() + 90
    try:
        info = await retry_transient(
            "pull", lambda: env.backend().pull(ref, deadline, on_progress),
            attempts=8, max_wait=1)
    finally:
        if killed:
            restart.join()
    assert killed, "the pull finished before any progress event"
    assert info.digest == env.digests[str(ref)]


async def test_deadline_expires_on_a_registry_that_never_answers(env: Env) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        backend = env.backend(allowed_registries=(address,), credentials=())
        started = time.monotonic()
        with pytest.raises((FatalError, TransientError), match=r"deadline|unreachable|broke"):
            await backend.pull(ref_of(f"{address}/{REPO}:v1.13.0"), started + 2,
                               lambda _: None)


async def test_extraction_refuses_a_link(env: Env, tmp_path: Path) -> None:
    ref = ref_of(env.ref(repo="kubeedge/crafted"))
    await env.backend().pull(ref, time.monotonic() + 60, lambda _: None)
    with pytest.raises(FatalError, match="refusing /usr/local/bin/keadm"):
        await env.backend().extract(ref, [KEADM], tmp_path / "out")
    assert not (tmp_path / "out" / "keadm").exists()
    assert env.client.containers.list(all=True) == []


async def test_inspect_touches_no_image_store(env: Env) -> None:
    ref = ref_of(env.ref())
    remove_image(env.client, str(ref))
    before = sorted(i.id for i in env.client.images.list())
    info = await env.backend().inspect(ref)
    assert info.digest == env.digests[str(ref)] and not info.present_locally
    assert info.size > 0  # from the registry manifest, for the free-space check
    assert sorted(i.id for i in env.client.images.list()) == before


def test_cli_upgrade_and_prepull_with_a_pulled_image(env: Env, sandbox: Sandbox) -> None:
    sandbox.configure(images={
        "backend": "docker", "docker": {"host": env.dockerd.host, "config": None},
        "allowed_registries": [env.registry.address],
        "credentials": {env.registry.address: {"username": USER,
                                               "password_file": str(env.password_file)}},
        "progress_interval_seconds": 0.1}, logging={"level": "debug"})
    repo = f"{env.registry.address}/{REPO}"
    remove_image(env.client, env.ref())
    rc, out = sandbox.cli_json("prepull", "--to-version", "v1.13.0", "--image", repo)
    assert rc == 0 and "prepulled" in out["job"]["reason"], out
    rc, out = sandbox.upgrade("v1.13.0", "--image", repo, "--dry-run")
    assert rc == 0 and out["plan"]["image"]["digest"] == env.digests[env.ref()]
    proc = sandbox.cli("--output", "json", "upgrade", "--to-version", "v1.13.0", "--image",
                       repo, "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["job"]["state"] == "succeeded"
    assert sandbox.running_version() == "v1.13.0"
    # The prepull staged the package: the upgrade checked it and did not extract it again.
    assert any("not extracted again" in r["reason"] for r in sandbox.reports()
               if r["operation"] == "upgrade")
    # The password is in no report, log line or output of the whole run.
    everything = proc.stdout + proc.stderr + "\n".join(json.dumps(r) for r in sandbox.reports())
    everything += "".join(p.read_text() for p in (sandbox.state_dir / "logs").glob("*.log"))
    assert PASSWORD not in everything


async def test_engine_down_is_transient_not_a_crash(tmp_path: Path) -> None:
    backend = DockerImageBackend(
        Images(backend="docker"), DockerSettings(f"unix://{tmp_path}/no-such.sock", None))
    with pytest.raises(TransientError, match="docker engine unreachable"):
        await backend.inspect(parse_image("kubeedge/installation-package:v1.13.0"))
    assert await backend.storage_path() is None
    assert backend.auth_for("docker.io") == {}  # anonymous, never the SDK's own fallback


def test_docker_config_can_be_turned_off() -> None:
    config = parse_config({"node_name": "node-1",
                           "images": {"backend": "docker", "docker": {"config": ""}}})
    assert config.images.settings == DockerSettings(config=None)
