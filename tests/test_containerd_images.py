"""The containerd image backend against a real containerd and a real registry.

A private ``containerd`` (own root, state and socket, CRI plugin on) runs
beside ``docker-registry`` with htpasswd auth. The package images are built
and pushed without Docker (``testkit.oci``), multi-arch ones included. After
the agent's pull, the test asks CRI's ``ImageStatus`` what keadm asks, with
no credentials; ``ctr images ls`` must show the image in ``k8s.io`` with the
registry's digest; the password must never appear in any process's argv.

Skipped only where containerd cannot start here; ``.ci/run`` sets
EDGE_TEST_REQUIRE_CONTAINERD=1, which turns that skip into a failure.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Sandbox

from agent.adapters.containerd_images import (
    ContainerdImageBackend,
    ContainerdSettings,
    cri_name,
)
from agent.adapters.images import EDGECORE, KEADM, verify_digest
from agent.adapters.registry import node_platform
from agent.config import Images, RegistryAuth, parse_config
from agent.errors import AgentError, FatalError
from agent.versions import parse_image
from testkit.containerdenv import Containerd, ContainerdUnavailable, image_status
from testkit.dockerenv import Registry, start_or_skip
from testkit.oci import Pusher, image, layer, package

USER, PASSWORD = "edge", "c0ntainerd-s3cret"
REPO = "kubeedge/installation-package"
REQUIRE = "EDGE_TEST_REQUIRE_CONTAINERD"


class Env:
    def __init__(self, containerd: Containerd, registry: Registry, workdir: Path) -> None:
        self.containerd = containerd
        self.registry = registry
        self.workdir = workdir
        self.pusher = Pusher(registry.address, USER, PASSWORD)
        self.password_file = workdir / "registry-password"
        self.password_file.write_text(PASSWORD + "\n")
        self.digests: dict[str, str] = {}

    def ref(self, version: str = "v1.19.0", repo: str = REPO) -> str:
        return f"{self.registry.address}/{repo}:{version}"

    def publish(self, version: str = "v1.19.0", repo: str = REPO) -> str:
        built = package(version, f"keadm {version}\n".encode(),
                        f"edgecore {version}\n".encode(), arch=node_platform().architecture)
        self.digests[self.ref(version, repo)] = self.pusher.push(repo, version, built)
        return self.ref(version, repo)

    def backend(self, password_file: Path | None = None, **images: Any) -> ContainerdImageBackend:
        base: dict[str, Any] = dict(
            backend="containerd", allowed_registries=(self.registry.address,),
            credentials=(RegistryAuth(self.registry.address, USER,
                                      str(password_file or self.password_file)),),
            progress_interval_seconds=0.01)
        base.update(images)
        settings = ContainerdSettings(address=str(self.containerd.socket),
                                      root=str(self.containerd.root))
        return ContainerdImageBackend(Images(**base), settings, self.workdir / "downloads")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("ctd")
    containerd = Containerd(workdir / "containerd")
    start_or_skip(containerd.start, ContainerdUnavailable, require_env=REQUIRE, what="containerd")
    registry = Registry(workdir / "registry", {USER: PASSWORD})
    registry.start()
    try:
        yield Env(containerd, registry, workdir)
    finally:
        registry.stop()
        containerd.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_private_pull_lands_where_keadm_looks(env: Env, tmp_path: Path) -> None:
    ref = parse_image(env.publish("v1.19.0"))
    backend = env.backend()
    info = run(backend.inspect(ref))  # the dry run: no layers fetched
    assert info.digest == env.digests[str(ref)] and not info.present_locally
    progress: list[str] = []
    pulled = run(backend.pull(ref, time.monotonic() + 60, progress.append))
    verify_digest(pulled, env.digests[str(ref)])
    assert progress[0].startswith(f"pulling {ref}: 0/") and "importing" in progress[-1]
    # What ctr shows, in k8s.io, under the name CRI gives it.
    assert env.containerd.images()[cri_name(ref)] == env.digests[str(ref)]
    # keadm's own first question, with no credentials: ImageStatus finds it.
    found = image_status(env.containerd.socket, str(ref))
    assert found is not None and cri_name(ref) in found.repo_tags
    # keadm and edgecore come out of the top layer, the base layer's keadm hidden.
    files = run(backend.extract(ref, [KEADM, EDGECORE], tmp_path / "out"))
    assert files[KEADM].read_bytes() == b"keadm v1.19.0\n"
    assert files[EDGECORE].read_bytes() == b"edgecore v1.19.0\n"
    assert os.access(files[KEADM], os.X_OK)
    # A second pull sees it present and fetches nothing.
    again: list[str] = []
    assert run(backend.pull(ref, time.monotonic() + 60, again.append)).present_locally
    assert again == [f"image {ref} already in containerd (k8s.io), {env.digests[str(ref)]}"]
    assert run(backend.inspect(ref)).present_locally


def test_a_docker_hub_style_name_is_normalised_as_cri_does() -> None:
    assert cri_name(parse_image("kubeedge/installation-package:v1.19.0")) == \
        "docker.io/kubeedge/installation-package:v1.19.0"
    assert cri_name(parse_image("busybox:1.36")) == "docker.io/library/busybox:1.36"
    assert cri_name(parse_image("reg.example.com:5000/a/b:v1")) == "reg.example.com:5000/a/b:v1"


def test_wrong_credentials_and_missing_tags_are_fatal_and_clear(env: Env,
                                                                tmp_path: Path) -> None:
    ref = parse_image(env.publish("v1.19.0"))
    bad = tmp_path / "bad-password"
    bad.write_text("wrong\n")
    with pytest.raises(FatalError, match="registry refused the credentials"):
        run(env.backend(password_file=bad).inspect(ref))
    with pytest.raises(FatalError, match=r"registry refused the credentials|requires credentials"):
        run(env.backend(credentials=()).pull(ref, time.monotonic() + 30, lambda _: None))
    missing = parse_image(env.ref("v9.9.9"))
    with pytest.raises(FatalError, match="image not found in the registry"):
        run(env.backend().inspect(missing))
    assert cri_name(missing) not in env.containerd.images()


def test_a_multi_arch_index_resolves_to_this_node(env: Env, tmp_path: Path) -> None:
    here = node_platform().architecture
    other = "arm64" if here != "arm64" else "amd64"
    mine = package("v1.20.0", b"keadm for this node\n", b"edgecore here\n", arch=here)
    theirs = image([layer({"usr/local/bin/keadm": b"wrong arch\n",
                           "usr/local/bin/edgecore": b"wrong arch\n"})], arch=other)
    digest = env.pusher.push_index(REPO, "v1.20.0", [theirs, mine])
    ref = parse_image(env.ref("v1.20.0"))
    backend = env.backend()
    info = run(backend.pull(ref, time.monotonic() + 60, lambda _: None))
    assert info.digest == digest  # the tag's digest: the index's
    assert env.containerd.images()[cri_name(ref)] == digest
    files = run(backend.extract(ref, [KEADM], tmp_path / "out"))
    assert files[KEADM].read_bytes() == b"keadm for this node\n"
    # Again, from containerd's own content this time (the pull's copy is used up).
    files = run(backend.extract(ref, [KEADM], tmp_path / "again"))
    assert files[KEADM].read_bytes() == b"keadm for this node\n"
    # An index without this node's platform is refused by name.
    env.pusher.push_index(REPO, "v1.20.1", [theirs])
    with pytest.raises(FatalError, match=f"no linux/{here}"):
        run(backend.inspect(parse_image(env.ref("v1.20.1"))))


def test_whiteouts_and_links_in_layers(env: Env, tmp_path: Path) -> None:
    base = layer({"usr/local/bin/keadm": b"k\n", "usr/local/bin/edgecore": b"e\n"})
    gone = layer({}, whiteouts=("usr/local/bin/edgecore",))
    env.pusher.push(REPO, "v1.21.0", image([base, gone], arch=node_platform().architecture))
    ref = parse_image(env.ref("v1.21.0"))
    backend = env.backend()
    run(backend.pull(ref, time.monotonic() + 60, lambda _: None))
    with pytest.raises(FatalError, match="has no regular file /usr/local/bin/edgecore"):
        run(backend.extract(ref, [KEADM, EDGECORE], tmp_path / "a"))
    linked = layer({"usr/local/bin/edgecore": b"e\n"}, links={"usr/local/bin/keadm": "/bin/sh"})
    env.pusher.push(REPO, "v1.21.1", image([linked], arch=node_platform().architecture))
    ref = parse_image(env.ref("v1.21.1"))
    run(backend.pull(ref, time.monotonic() + 60, lambda _: None))
    with pytest.raises(FatalError, match="not a regular file"):
        run(backend.extract(ref, [KEADM], tmp_path / "b"))


def test_the_password_never_reaches_a_command_line(env: Env) -> None:
    """Sample every process's argv while the pull and import run."""
    big = package("v1.22.0", os.urandom(8 << 20), os.urandom(8 << 20),
                  arch=node_platform().architecture)
    env.pusher.push(REPO, "v1.22.0", big)
    ref = parse_image(env.ref("v1.22.0"))
    seen: list[bytes] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        seen.append((entry / "cmdline").read_bytes())
                    except OSError:
                        continue
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run(env.backend().pull(ref, time.monotonic() + 120, lambda _: None))
    finally:
        stop.set()
        sampler.join()
    assert any(b"ctr" in cmd and b"import" in cmd for cmd in seen)  # the sampler saw ctr run
    assert not any(PASSWORD.encode() in cmd for cmd in seen)


def test_containerd_down_is_transient(tmp_path: Path) -> None:
    backend = ContainerdImageBackend(
        Images(backend="containerd"),
        ContainerdSettings(address=str(tmp_path / "no.sock")), tmp_path / "dl")
    with pytest.raises(AgentError, match="containerd unreachable"):
        run(backend.extract(parse_image("kubeedge/installation-package:v1.19.0"), [KEADM],
                            tmp_path / "out"))


def test_config_and_table(tmp_path: Path) -> None:
    config = parse_config({"node_name": "n", "images": {
        "backend": "containerd", "containerd": {"address": "/run/k3s/containerd.sock"}}})
    assert config.images.settings == ContainerdSettings(address="/run/k3s/containerd.sock")
    from agent.node import build_node

    node = build_node(config.with_root(tmp_path))
    try:
        assert isinstance(node.images, ContainerdImageBackend)
        assert node.images.downloads == tmp_path / "var/lib/edge-upgrade-agent/downloads"
    finally:
        node.close()


@pytest.mark.parametrize(("edged", "backend", "address"), [
    ({"containerRuntime": "docker", "remoteRuntimeEndpoint": "unix:///var/run/dockershim.sock"},
     "docker", None),
    ({"containerRuntime": "remote",
      "remoteRuntimeEndpoint": "unix:///var/run/containerd/containerd.sock"},
     "containerd", "/var/run/containerd/containerd.sock"),
    ({"tailoredKubeletConfig": {"containerRuntimeEndpoint": "unix:///run/k3s/containerd.sock"}},
     "containerd", "/run/k3s/containerd.sock"),
    ({"tailoredKubeletConfig": {}}, "containerd", "/run/containerd/containerd.sock"),
    ({"tailoredKubeletConfig": {"containerRuntimeEndpoint": "unix:///run/cri-dockerd.sock"}},
     "docker", None),
])
def test_auto_follows_the_runtime_edgecore_uses(tmp_path: Path, edged: dict[str, Any],
                                                backend: str, address: str | None) -> None:
    import yaml

    from agent.adapters.docker_images import DockerImageBackend
    from agent.node import build_node

    config_file = tmp_path / "etc/kubeedge/config/edgecore.yaml"
    config_file.parent.mkdir(parents=True)
    config_file.write_text(yaml.safe_dump({"modules": {"edged": edged}}))
    config = parse_config({"node_name": "n", "paths": {"root": str(tmp_path)},
                           "images": {"backend": "auto",
                                      "containerd": {"namespace": "k8s.io"}}})
    node = build_node(config)
    try:
        kind = {"docker": DockerImageBackend, "containerd": ContainerdImageBackend}[backend]
        assert isinstance(node.images, kind)
        if isinstance(node.images, ContainerdImageBackend):
            assert node.images.settings.address == address
    finally:
        node.close()


def test_auto_refuses_a_runtime_it_cannot_pull_for(tmp_path: Path) -> None:
    from agent.adapters.auto_images import choose
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match=r"crio\.sock"):
        choose("unix:///var/run/crio/crio.sock")


def test_cli_upgrade_on_a_containerd_node(env: Env, sandbox: Sandbox) -> None:
    """The whole pipeline from the CLI, the package pulled through containerd: dry run,
    then the upgrade (keadm's Era B argv), with the password in no output or report."""
    from testkit.standins import write_edgecore, write_keadm

    version = "v1.19.0"
    bins = env.workdir / f"bins-{version}"
    keadm = write_keadm(bins / "keadm", version).read_bytes()
    edgecore = write_edgecore(bins / "edgecore", version).read_bytes()
    built = package(version, keadm, edgecore, arch=node_platform().architecture)
    digest = env.pusher.push(f"{REPO}-cli", version, built)  # a repo no other test pulled
    repo = f"{env.registry.address}/{REPO}-cli"
    sandbox.configure(images={
        "backend": "containerd",
        "containerd": {"address": str(env.containerd.socket), "root": str(env.containerd.root)},
        "allowed_registries": [env.registry.address],
        "credentials": {env.registry.address: {"username": USER,
                                               "password_file": str(env.password_file)}}})
    # keadm v1.19+ asks the runtime edgecore.yaml names: here, the test's containerd.
    import yaml

    edgecore_yaml = sandbox.root / "etc/kubeedge/config/edgecore.yaml"
    data = yaml.safe_load(edgecore_yaml.read_text())
    data.setdefault("modules", {}).setdefault("edged", {})["tailoredKubeletConfig"] = {
        "containerRuntimeEndpoint": f"unix://{env.containerd.socket}"}
    edgecore_yaml.write_text(yaml.safe_dump(data))
    rc, plan = sandbox.upgrade(version, "--image", repo, "--dry-run")
    assert rc == 0 and plan["plan"]["image"]["digest"] == digest, plan
    assert f"{repo}:{version}" in plan["plan"]["installerArgv"]  # Era B: the full reference
    assert cri_name(parse_image(f"{repo}:{version}")) not in env.containerd.images()
    rc, pre = sandbox.cli_json("prepull", "--to-version", version, "--image", repo)
    assert rc == 0 and "prepulled" in pre["job"]["reason"], pre
    assert env.containerd.images()[f"{repo}:{version}"] == digest
    proc = sandbox.cli("--output", "json", "upgrade", "--to-version", version, "--image", repo,
                       "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sandbox.running_version() == version
    assert env.containerd.images()[f"{repo}:{version}"] == digest
    everything = proc.stdout + proc.stderr + "\n".join(str(r) for r in sandbox.reports())
    everything += "".join(p.read_text() for p in (sandbox.state_dir / "logs").glob("*.log"))
    assert PASSWORD not in everything
    assert any(r["reason"].startswith(f"pulling {repo}:{version}") for r in sandbox.reports())
    # The prepull staged the package: the upgrade found it in containerd and staged.
    upgrade = [r["reason"] for r in sandbox.reports() if r["operation"] == "upgrade"]
    assert f"image {repo}:{version} already in containerd (k8s.io), {digest}" in upgrade
    assert any("not extracted again" in reason for reason in upgrade)
    # keadm's CRI ImageStatus found what the agent imported: it pulled nothing itself.
    keadm_log = "".join(p.read_text() for p in (sandbox.state_dir / "logs").glob("*.log"))
    assert f"ImageStatus: image {repo}:{version} is already in the runtime's store" in keadm_log
