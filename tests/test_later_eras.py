"""The stand-ins of the later releases, driven with the agent's own keadm argv.

Real builds of v1.19.0/v1.20.0 (Era B) and v1.22.2/v1.23.1 (Era C) are not
shipped here, so these hold the stand-ins to ../shared/kubeedge/README.md,
"Facts about later releases" and the measurements after it: Era B pulls
``--image`` exactly as given (a bare repo is ``:latest`` and fails), Era C
pulls ``<--image>:<--toVersion>`` (a tagged ``--image`` fails), asks y/N
without ``--force``, keeps the unit and writes ``upgrade_report.json``; both
ask CRI ImageStatus before any pull and use no credentials; edgecore v1.21+
rewrites its config at every start. No systemd, no containerd: a sandbox root
(EDGE_UPGRADE_ROOT) and, for CRI, a fake ``ctr`` first on PATH.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Sandbox

from agent.adapters.edgecore import embedded_versions
from agent.adapters.keadm import InstallSpec, era, keadm_argv
from agent.versions import ImageRef, Version
from testkit.standins import (
    edgecore_pid,
    logged_version,
    make_image_dir,
    make_node,
    start_edgecore,
    stop_edgecore,
)

PRIVATE = "registry.local:5000/kubeedge/installation-package"
HUB = "kubeedge/installation-package"
CONFIG = Path("etc/kubeedge/config/edgecore.yaml")
BINARY = Path("usr/local/bin/edgecore")
DB = Path("var/lib/kubeedge/edgecore.db")
LOCK = Path("etc/kubeedge/idempotency_record")
UNIT = Path("etc/systemd/system/edgecore.service")
BACKUP = Path("etc/kubeedge/backup")
UPGRADE = Path("etc/kubeedge/upgrade")
REPORT = Path("etc/kubeedge/upgrade_report.json")
LOG = Path("var/log/edgecore.log")
# (from, to) per era: the agent runs the keadm of the target's package.
ERA_B = ("v1.19.0", "v1.20.0")
ERA_C = ("v1.22.2", "v1.23.1")
OPERATOR_UNIT = """[Unit]
Description=edgecore (operator's own)
[Service]
ExecStart=/usr/local/bin/edgecore --config /etc/kubeedge/config/edgecore.yaml
Environment=SITE=1
KillMode=process
[Install]
WantedBy=multi-user.target
"""
CTR_HEADER = "REF TYPE DIGEST SIZE PLATFORMS LABELS"
# A tiny `ctr`: logs its argv, answers `images ls name==<ref>` with the header and
# a line for <ref> if <ref> is listed in the "present" file beside it.
FAKE_CTR = f"""#!{sys.executable}
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
with open(os.path.join(here, "ctr-argv.jsonl"), "a", encoding="utf-8") as fh:
    fh.write(json.dumps(args) + "\\n")
if args[4:6] != ["images", "ls"] or not args[-1].startswith("name=="):
    sys.exit("fake ctr: unexpected arguments")
with open(os.path.join(here, "present"), encoding="utf-8") as fh:
    present = fh.read().split()
print("{CTR_HEADER}")
name = args[-1][len("name=="):]
if args[3] == "k8s.io" and name in present:
    print(name + " application/vnd.oci.image.manifest.v1+json sha256:" + "ab" * 32
          + " 12.1 MiB linux/amd64 -")
"""


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def log_text(root: Path) -> str:
    path = root / LOG
    return path.read_text() if path.exists() else ""


def read_config(root: Path) -> dict[str, Any]:
    data = yaml.safe_load((root / CONFIG).read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    roots: list[Path] = []

    def make(version: str, *, name: str = "root", unit: bool = True, **kwargs: Any) -> Path:
        root = tmp_path / name
        make_node(root, version, **kwargs)
        if unit:
            (root / UNIT).parent.mkdir(parents=True, exist_ok=True)
            (root / UNIT).write_text(OPERATOR_UNIT)
        roots.append(root)
        return root

    yield make
    for root in roots:
        stop_edgecore(root)


def package_keadm(tmp_path: Path, repo: str, version: str) -> Path:
    """The target's package: keadm and edgecore of ``version``."""
    image = make_image_dir(tmp_path / "images", repo, version)
    return image / "usr/local/bin/keadm"


def agent_argv(keadm: Path, root: Path, from_version: str, to_version: str,
               repo: str) -> list[str]:
    spec = InstallSpec(keadm=keadm, from_version=Version.parse(from_version),
                       to_version=Version.parse(to_version), image=ImageRef(repo),
                       edgecore_config=root / CONFIG, upgrade_id="job-1", history_id="h-1")
    return keadm_argv(spec)


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def run(argv: list[str], root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # As the agent runs it: stdin closed (/dev/null), a sandbox root.
    full = {**os.environ, "EDGE_UPGRADE_ROOT": str(root), **env}
    return subprocess.run(argv, capture_output=True, text=True, env=full, timeout=30,
                          check=False, stdin=subprocess.DEVNULL)


class Snapshot:
    """What an upgrade must leave alone when it fails or aborts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pid = edgecore_pid(root)
        self.files = {p: (root / p).read_bytes() for p in (BINARY, DB, UNIT, CONFIG)
                      if (root / p).exists()}

    def assert_untouched(self) -> None:
        assert self.pid is not None
        assert edgecore_pid(self.root) == self.pid
        for path, data in self.files.items():
            assert (self.root / path).read_bytes() == data, path
        assert not (self.root / LOCK).exists()


def started(root: Path) -> int:
    """The running edgecore's pid, once it has logged its start."""
    pid = edgecore_pid(root)
    assert pid is not None
    wait_until(lambda: logged_version(root, pid) is not None and
               log_text(root).count("all modules running") >= 1)
    return pid


# -- Era B: v1.19/v1.20 `keadm upgrade edge` -------------------------------------------


def test_era_b_agent_argv_upgrades(node: Callable[..., Path], tmp_path: Path) -> None:
    old, new = ERA_B
    root = node(old)
    old_pid = start_edgecore(root)
    keadm = package_keadm(tmp_path, PRIVATE, new)
    argv = agent_argv(keadm, root, old, new, PRIVATE)
    found = era(Version.parse(new))
    assert found is not None and found.name == "B"
    assert argv[argv.index("--image") + 1] == f"{PRIVATE}:{new}"  # the full reference
    assert "--disable-backup" in argv
    result = run(argv, root)
    assert result.returncode == 0, result.stderr
    assert embedded_versions(root / BINARY) == [new]
    new_pid = edgecore_pid(root)
    assert new_pid is not None and new_pid != old_pid
    wait_until(lambda: logged_version(root, new_pid) == new)
    assert not (root / BACKUP).exists()  # --disable-backup
    # --toVersion only names the staging dir, which is left behind.
    assert (root / UPGRADE / new / "edgecore").read_bytes() == (root / BINARY).read_bytes()
    # keadm deletes the operator's unit and writes its own.
    unit = (root / UNIT).read_text()
    assert 'Environment="DEPLOY_MQTT_CONTAINER=false"' in unit
    assert "SITE=1" not in unit
    # Copied out of the image by a pod sandbox; the report to edgeHub.httpServer
    # fails (no cloud) and is only logged.
    assert 'running sh -c "sleep infinity"' in result.stderr
    assert "https://127.0.0.1:10002/task/upgrade/name/job-1/node/node-1/status" in result.stderr
    assert "failed to report upgrade result to cloud" in result.stderr
    assert not (root / LOCK).exists() and not (root / REPORT).exists()
    # v1.20 does not rewrite the config (only v1.21+ does).
    assert "edgecoreVersion" not in read_config(root)


def test_era_b_backs_up_without_disable_backup(node: Callable[..., Path],
                                               tmp_path: Path) -> None:
    old, new = ERA_B
    root = node(old)
    start_edgecore(root)
    argv = [a for a in agent_argv(package_keadm(tmp_path, PRIVATE, new), root, old, new,
                                  PRIVATE) if a != "--disable-backup"]
    result = run(argv, root)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (root / BACKUP / old).iterdir()) == [
        "edgecore", "edgecore.db", "edgecore.yaml"]


@pytest.mark.parametrize("repo", [PRIVATE, HUB])
def test_era_b_bare_repo_pulls_latest_and_fails(node: Callable[..., Path], tmp_path: Path,
                                                repo: str) -> None:
    old, new = ERA_B
    root = node(old)
    start_edgecore(root)
    started(root)
    before = Snapshot(root)
    argv = with_flag(agent_argv(package_keadm(tmp_path, repo, new), root, old, new, repo),
                     "--image", repo)
    result = run(argv, root)
    assert result.returncode == 1
    latest = f"{repo}:latest" if repo == PRIVATE else f"docker.io/{repo}:latest"
    assert (f"Error: upgrade pre process failed: pull image failed: failed to pull image "
            f"{repo}: ") in result.stderr
    assert f'failed to resolve reference "{latest}"' in result.stderr
    assert result.stdout.splitlines()[-1].startswith("execute keadm command failed:  ")
    before.assert_untouched()
    assert not (root / UPGRADE).exists()


# -- Era C: v1.22/v1.23 `keadm upgrade edge --force` ----------------------------------


def test_era_c_agent_argv_upgrades(node: Callable[..., Path], tmp_path: Path) -> None:
    old, new = ERA_C
    root = node(old)
    old_pid = start_edgecore(root)
    # The v1.22 edgecore wrote edgecoreVersion at start: keadm's current version.
    wait_until(lambda: read_config(root).get("edgecoreVersion") == old)
    keadm = package_keadm(tmp_path, PRIVATE, new)
    argv = agent_argv(keadm, root, old, new, PRIVATE)
    assert argv[1:5] == ["upgrade", "edge", "--force", "--toVersion"]
    assert argv[argv.index("--image") + 1] == PRIVATE  # keadm appends :<toVersion>
    result = run(argv, root)
    assert result.returncode == 0, result.stderr
    assert f"pulling image {PRIVATE}:{new}" in result.stdout
    assert embedded_versions(root / BINARY) == [new]
    new_pid = edgecore_pid(root)
    assert new_pid is not None and new_pid != old_pid
    wait_until(lambda: logged_version(root, new_pid) == new)
    assert (root / UNIT).read_text() == OPERATOR_UNIT  # the unit is kept
    assert not (root / BACKUP).exists()  # no backup of its own
    assert not (root / UPGRADE / new).exists()  # staging removed
    assert not (root / LOCK).exists()
    assert json.loads((root / REPORT).read_text()) == {
        "event": "Upgrade", "success": True, "fromVersion": old, "toVersion": new,
        "errorMessage": ""}
    assert 'running sh -c "sleep infinity"' in result.stderr
    # The new edgecore rewrites the config with its own version.
    wait_until(lambda: read_config(root).get("edgecoreVersion") == new)


def test_era_c_current_version_from_metaserver_first(node: Callable[..., Path],
                                                     tmp_path: Path) -> None:
    old, new = ERA_C
    port = free_port()
    root = node(old, metaserver_port=port)
    start_edgecore(root)
    wait_until(lambda: read_config(root).get("edgecoreVersion") == old)
    config = read_config(root)
    config["edgecoreVersion"] = "v1.22.0"  # stale: MetaServer's answer wins
    (root / CONFIG).write_text(yaml.safe_dump(config))
    wait_until(lambda: metaserver_up(port))
    result = run(agent_argv(package_keadm(tmp_path, HUB, new), root, old, new, HUB), root)
    assert result.returncode == 0, result.stderr
    assert json.loads((root / REPORT).read_text())["fromVersion"] == old


def test_era_c_tagged_image_fails(node: Callable[..., Path], tmp_path: Path) -> None:
    old, new = ERA_C
    root = node(old)
    start_edgecore(root)
    started(root)
    before = Snapshot(root)
    keadm = package_keadm(tmp_path, PRIVATE, new)
    argv = with_flag(agent_argv(keadm, root, old, new, PRIVATE), "--image", f"{PRIVATE}:{new}")
    result = run(argv, root)
    assert result.returncode == 1
    bad = f"{PRIVATE}:{new}:{new}"
    assert f"Error: failed to pull image {bad}: " in result.stderr
    assert "invalid reference format" in result.stderr
    before.assert_untouched()
    assert not (root / UPGRADE).exists()
    # The node is untouched; the failed result is what keadm reports.
    report = json.loads((root / REPORT).read_text())
    assert (report["success"], report["toVersion"]) == (False, new)
    assert bad in report["errorMessage"]


def test_era_c_without_force_and_stdin_closed_aborts(node: Callable[..., Path],
                                                     tmp_path: Path) -> None:
    old, new = ERA_C
    root = node(old)
    start_edgecore(root)
    started(root)
    before = Snapshot(root)
    argv = [a for a in agent_argv(package_keadm(tmp_path, PRIVATE, new), root, old, new,
                                  PRIVATE) if a != "--force"]
    result = run(argv, root)
    assert result.returncode == 0
    assert "Are you sure you want to proceed? [y/N]: " in result.stdout
    assert "aborted upgrade operation" in result.stderr
    before.assert_untouched()
    assert not (root / REPORT).exists() and not (root / UPGRADE).exists()


def test_era_c_to_version_defaults_to_the_minors_dot_zero(node: Callable[..., Path],
                                                          tmp_path: Path) -> None:
    root = node("v1.22.2")
    keadm = package_keadm(tmp_path, HUB, "v1.23.1")
    result = run([str(keadm), "upgrade", "edge", "--help"], root)
    assert result.returncode == 0
    assert '--toVersion string      (default "v1.23.0")' in result.stdout


# -- CRI: ImageStatus first, no credentials ------------------------------------------------


@pytest.fixture
def fake_ctr(tmp_path: Path) -> Callable[[list[str]], dict[str, str]]:
    """Install the fake ctr; returns the env that makes the stand-in use it."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    ctr = bindir / "ctr"
    ctr.write_text(FAKE_CTR)
    ctr.chmod(0o755)

    def env(present: list[str]) -> dict[str, str]:
        (bindir / "present").write_text("\n".join(present) + "\n")
        return {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
                "EDGE_STANDIN_CRI_SOCKET": str(tmp_path / "containerd.sock")}

    return env


def ctr_calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "fakebin" / "ctr-argv.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("case", [
    ("B", PRIVATE, True),
    ("B", HUB, False),
    ("C", HUB, True),
    ("C", PRIVATE, False),
], ids=["B-private-present", "B-hub-absent", "C-hub-present", "C-private-absent"])
def test_cri_image_status_first(node: Callable[..., Path], tmp_path: Path,
                                fake_ctr: Callable[[list[str]], dict[str, str]],
                                case: tuple[str, str, bool]) -> None:
    era_name, repo, present = case
    old, new = ERA_B if era_name == "B" else ERA_C
    root = node(old)
    start_edgecore(root)
    started(root)
    before = Snapshot(root)
    # CRI's name: Docker Hub paths get docker.io/, a registry host is kept.
    cri_name = f"{repo}:{new}" if repo == PRIVATE else f"docker.io/{repo}:{new}"
    env = fake_ctr([cri_name] if present else ["docker.io/library/busybox:latest"])
    result = run(agent_argv(package_keadm(tmp_path, repo, new), root, old, new, repo), root,
                 **env)
    # One ImageStatus question, by name, in CRI's namespace; never a credential.
    assert ctr_calls(tmp_path) == [["--address", env["EDGE_STANDIN_CRI_SOCKET"],
                                    "--namespace", "k8s.io", "images", "ls",
                                    f"name=={cri_name}"]]
    if present:
        assert result.returncode == 0, result.stderr
        assert f"ImageStatus: image {cri_name} is already in the runtime's store, " \
               "skipping the pull" in result.stderr
        assert f'out of image {cri_name} to ' in result.stderr
        assert embedded_versions(root / BINARY) == [new]
        return
    assert result.returncode == 1
    assert f"failed to pull image {repo}:{new}: " in result.stderr
    assert "401 Unauthorized" in result.stderr
    host = "registry-1.docker.io" if repo == HUB else "registry.local:5000"
    path = repo.removeprefix("registry.local:5000/")
    assert f"https://{host}/v2/{path}/manifests/{new}: 401 Unauthorized" in result.stderr
    before.assert_untouched()


def test_era_a_never_asks_cri(node: Callable[..., Path], tmp_path: Path,
                              fake_ctr: Callable[[list[str]], dict[str, str]]) -> None:
    root = node("v1.12.1")
    start_edgecore(root)
    argv = agent_argv(package_keadm(tmp_path, PRIVATE, "v1.13.0"), root, "v1.12.1", "v1.13.0",
                      PRIVATE)
    result = run(argv, root, **fake_ctr([]))
    assert result.returncode == 0, result.stderr  # Era A pulls through Docker
    assert ctr_calls(tmp_path) == []


# -- edgecore v1.21+: the config is rewritten at every start -------------------------------


@pytest.mark.parametrize("version", ["v1.21.0", "v1.23.1"])
def test_edgecore_v121_rewrites_config_at_every_start(node: Callable[..., Path],
                                                      version: str) -> None:
    root = node(version, unit=False)
    config = read_config(root)
    config["operatorNote"] = "not an EdgeCoreConfig field"
    config["modules"]["edged"]["edgecoreVersion"] = "v1.0.0"  # not a field there either
    config["featureGates"] = {"requireAuthorization": True}
    (root / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (root / CONFIG).chmod(0o640)
    start_edgecore(root)
    wait_until(lambda: "edgecoreVersion" in read_config(root))
    rewritten = read_config(root)
    assert rewritten["edgecoreVersion"] == version
    assert set(rewritten) == {"apiVersion", "kind", "database", "modules", "featureGates",
                              "edgecoreVersion"}
    assert rewritten["modules"]["edged"] == {"hostnameOverride": "node-1"}
    for key in ("apiVersion", "kind", "database", "featureGates"):
        assert rewritten[key] == config[key], key
    assert rewritten["modules"]["metaManager"] == config["modules"]["metaManager"]
    assert (root / CONFIG).stat().st_mode & 0o777 == 0o640
    assert "dropped unknown fields operatorNote" in log_text(root)
    assert log_text(root).count(version) == 1  # still only in the Version: line
    # At every start: a stale value is replaced again.
    stop_edgecore(root)
    rewritten["edgecoreVersion"] = "v1.20.0"
    (root / CONFIG).write_text(yaml.safe_dump(rewritten))
    start_edgecore(root)
    wait_until(lambda: read_config(root)["edgecoreVersion"] == version)


@pytest.mark.parametrize("version", ["v1.12.1", "v1.13.0", "v1.20.0"])
def test_edgecore_before_v121_leaves_config_alone(node: Callable[..., Path],
                                                  version: str) -> None:
    root = node(version, unit=False)
    config = read_config(root)
    config["operatorNote"] = "kept"
    (root / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    data, mtime = (root / CONFIG).read_bytes(), (root / CONFIG).stat().st_mtime_ns
    start_edgecore(root)
    started(root)
    stop_edgecore(root)
    assert (root / CONFIG).read_bytes() == data
    assert (root / CONFIG).stat().st_mtime_ns == mtime


# -- helpers used above ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metaserver_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return bool(resp.read() == b"ok")
    except OSError:
        return False


# -- the agent's side of keadm v1.21+'s upgrade_report.json ---------------------------


def test_keadm_report_and_exit_code_must_both_say_success() -> None:
    from agent.errors import InstallError
    from agent.steps.install import check_result

    check_result(0, None)
    check_result(0, {"event": "Upgrade", "success": True})
    with pytest.raises(InstallError, match=r"exited 0 but its upgrade_report\.json says it "
                                           r"failed: pull failed"):
        check_result(0, {"success": False, "errorMessage": "pull failed"})
    with pytest.raises(InstallError, match="exited with code 1: boom"):
        check_result(1, {"success": False, "errorMessage": "boom"})


def test_keadm_report_is_taken_once_and_only_from_this_run(tmp_path: Path) -> None:
    from agent.config import parse_config
    from agent.node import build_node
    from agent.steps.install import KEADM_REPORT, take_keadm_report

    node = build_node(parse_config({"node_name": "n", "paths": {"root": str(tmp_path)},
                                    "service": {"manager": "process"}}))
    try:
        report = tmp_path / KEADM_REPORT.lstrip("/")
        report.parent.mkdir(parents=True)
        report.write_text(json.dumps({"success": True}))
        old = time.time() - 60
        os.utime(report, (old, old))
        assert take_keadm_report(node, time.time()) is None and report.exists()
        started = time.time()
        report.write_text(json.dumps({"success": False, "errorMessage": "x"}))
        assert take_keadm_report(node, started) == {"success": False, "errorMessage": "x"}
        assert not report.exists()
        report.write_text("{not json")
        taken = take_keadm_report(node, started)
        assert taken is not None and taken["success"] is False
    finally:
        node.close()


def test_a_custom_installer_can_pass_keadm_v121_the_bare_repository() -> None:
    from agent.adapters.keadm import custom_argv

    spec = InstallSpec(keadm=Path("/s/keadm"), from_version=Version.parse("v1.20.0"),
                       to_version=Version.parse("v1.22.2"),
                       image=ImageRef("reg.example.com:5000/kubeedge/pkg"),
                       edgecore_config=Path("/etc/kubeedge/config/edgecore.yaml"),
                       upgrade_id="job-1", history_id="", image_digest=None)
    argv = custom_argv(("{keadm}", "upgrade", "edge", "--force", "--image", "{repo}",
                        "--toVersion", "{to_version}"), spec)
    assert argv[5] == "reg.example.com:5000/kubeedge/pkg" and argv[7] == "v1.22.2"


# -- edgecore v1.21+ rewrites its config: success is fine, rollback restores the bytes ------


def test_v121_config_rewrite_is_no_error_and_rollback_restores_the_bytes(sandbox: Sandbox) -> None:
    config = sandbox.root / "etc/kubeedge/config/edgecore.yaml"
    before = config.read_bytes()
    sandbox.image("v1.21.0")
    rc, out = sandbox.upgrade("v1.21.0")
    assert rc == 0 and out["job"]["state"] == "succeeded", out
    assert sandbox.running_version() == "v1.21.0"
    assert config.read_bytes() != before  # the new edgecore rewrote it: normal
    rc, out = sandbox.cli_json("rollback", "--yes")
    assert rc == 0 and out["job"]["state"] == "rolled_back", out
    assert sandbox.running_version() == "v1.12.1"
    assert config.read_bytes() == before


def test_v121_crash_after_its_config_rewrite_is_rolled_back_byte_for_byte(sandbox: Sandbox) -> None:
    config = sandbox.root / "etc/kubeedge/config/edgecore.yaml"
    before = config.read_bytes()
    sandbox.image("v1.21.0", edgecore_behaviour="crash")
    rc, out = sandbox.upgrade("v1.21.0")
    assert rc == 1 and out["job"]["state"] == "rolled_back", out
    assert sandbox.running_version() == "v1.12.1"
    assert config.read_bytes() == before
