"""Checks that the keadm/edgecore stand-ins behave as the agent's tests assume."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from standins import (
    edgecore_pid,
    make_image_dir,
    make_node,
    start_edgecore,
    stop_edgecore,
    write_edgecore,
    write_keadm,
)

OLD = "v1.12.0"
NEW = "v1.13.0"
REPO = "registry.local:5000/kubeedge/installation-package"
CONFIG = Path("etc/kubeedge/config/edgecore.yaml")
LOCK = Path("etc/kubeedge/idempotency_record")
BINARY = Path("usr/local/bin/edgecore")
DB = Path("var/lib/kubeedge/edgecore.db")

NodeFactory = Callable[..., Path]


@pytest.fixture
def new_node(tmp_path: Path) -> Iterator[NodeFactory]:
    roots: list[Path] = []

    def make(name: str = "root", version: str = OLD, **kwargs: Any) -> Path:
        root = tmp_path / name
        make_node(root, version, **kwargs)
        roots.append(root)
        return root

    yield make
    for root in roots:
        stop_edgecore(root)


def run(argv: list[str | Path], root: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if root is not None:
        env["EDGE_UPGRADE_ROOT"] = str(root)
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, env=env, timeout=20, check=False
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def process_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def db_version(root: Path) -> str:
    # Read-only so the check itself cannot alter the file under test.
    conn = sqlite3.connect(f"file:{root / DB}?mode=ro", uri=True)
    try:
        return str(conn.execute("SELECT v FROM meta WHERE k = 'version'").fetchone()[0])
    finally:
        conn.close()


def log_text(root: Path) -> str:
    path = root / "var/log/edgecore.log"
    return path.read_text() if path.exists() else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def era_argv(era: str, root: Path) -> list[str | Path]:
    common: list[str | Path] = ["--toVersion", NEW, "--image", REPO, "--config", root / CONFIG]
    ids: list[str | Path] = ["--upgradeID", "u1", "--historyID", "h1", "--fromVersion", OLD]
    if era == "A":
        return ["upgrade", *ids, *common]
    if era == "B":
        return ["upgrade", "edge", *ids, *common, "--disable-backup", "--type", "upgrade"]
    return ["upgrade", "edge", "--force", *common, "--image-digest", "sha256:abc"]


def test_edgecore_version_flag(tmp_path: Path) -> None:
    with_flag = write_edgecore(tmp_path / "a" / "edgecore", NEW)
    without = write_edgecore(tmp_path / "b" / "edgecore", OLD, version_flag=False)
    assert with_flag.stat().st_mode & 0o777 == 0o755
    assert with_flag.read_text().splitlines()[0] == f"#!{sys.executable}"
    ok = run([with_flag, "--version"])
    assert (ok.returncode, ok.stdout) == (0, f"KubeEdge {NEW}\n")
    bad = run([without, "--version"])
    assert bad.returncode == 1
    assert "Error: unknown flag: --version" in bad.stderr
    assert run([with_flag, "--bogus"]).returncode == 2


def test_start_stop_does_not_touch_db_of_same_version(new_node: NodeFactory) -> None:
    root = new_node()
    db_before = (root / DB).read_bytes()
    pid = start_edgecore(root)
    assert edgecore_pid(root) == pid
    wait_until(lambda: "started" in log_text(root))
    assert (root / DB).read_bytes() == db_before
    stop_edgecore(root)
    assert edgecore_pid(root) is None
    assert not (root / "run/edgecore.pid").exists()


def test_old_build_on_restored_db_leaves_it_untouched(new_node: NodeFactory) -> None:
    root = new_node()
    old_binary, old_db = (root / BINARY).read_bytes(), (root / DB).read_bytes()
    write_edgecore(root / BINARY, NEW)
    start_edgecore(root)
    wait_until(lambda: db_version(root) == NEW)
    stop_edgecore(root)
    (root / BINARY).write_bytes(old_binary)
    (root / DB).write_bytes(old_db)
    mtime = (root / DB).stat().st_mtime_ns
    start_edgecore(root)
    wait_until(lambda: log_text(root).count("started") == 2)
    assert (root / DB).read_bytes() == old_db
    assert (root / DB).stat().st_mtime_ns == mtime


def test_crashing_build_exits(new_node: NodeFactory) -> None:
    root = new_node()
    write_edgecore(root / BINARY, NEW, behaviour="crash")
    start_edgecore(root)
    wait_until(lambda: edgecore_pid(root) is None)
    assert "simulated crash" in log_text(root)


@pytest.mark.parametrize("era", ["A", "B", "C"])
def test_keadm_ok_upgrade(new_node: NodeFactory, tmp_path: Path, era: str) -> None:
    root = new_node(config_version_field=True)
    old_pid = start_edgecore(root)
    image = make_image_dir(tmp_path / "images", REPO, NEW)
    assert image == tmp_path / "images" / REPO / NEW
    result = run([image / "usr/local/bin/keadm", *era_argv(era, root)], root)
    assert result.returncode == 0, result.stderr
    assert "finished" in result.stdout
    assert run([root / BINARY, "--version"]).stdout == f"KubeEdge {NEW}\n"
    new_pid = edgecore_pid(root)
    assert new_pid is not None and new_pid != old_pid
    assert not process_running(old_pid)
    wait_until(lambda: db_version(root) == NEW)
    assert not (root / LOCK).exists()
    assert not (root / "usr/local/bin/.edgecore.new").exists()


def test_keadm_fail_leaves_node_untouched(new_node: NodeFactory, tmp_path: Path) -> None:
    root = new_node()
    pid = start_edgecore(root)
    wait_until(lambda: "started" in log_text(root))
    binary, db = (root / BINARY).read_bytes(), (root / DB).read_bytes()
    image = make_image_dir(tmp_path / "images", REPO, NEW, keadm_behaviour="fail")
    result = run([image / "usr/local/bin/keadm", *era_argv("C", root)], root)
    assert result.returncode == 1
    assert f"Error: failed to pull image {REPO}:{NEW}: simulated" in result.stderr
    assert edgecore_pid(root) == pid
    assert (root / BINARY).read_bytes() == binary
    assert (root / DB).read_bytes() == db
    assert not (root / LOCK).exists()


def test_keadm_fail_after_stop_half_installs(new_node: NodeFactory, tmp_path: Path) -> None:
    root = new_node()
    start_edgecore(root)
    image = make_image_dir(tmp_path / "images", REPO, NEW, keadm_behaviour="fail-after-stop")
    result = run([image / "usr/local/bin/keadm", *era_argv("C", root)], root)
    assert result.returncode == 1
    assert edgecore_pid(root) is None
    assert (root / BINARY).stat().st_size == 0
    assert not (root / LOCK).exists()


def test_keadm_ok_no_restart(new_node: NodeFactory, tmp_path: Path) -> None:
    root = new_node()
    start_edgecore(root)
    image = make_image_dir(tmp_path / "images", REPO, NEW, keadm_behaviour="ok-no-restart")
    result = run([image / "usr/local/bin/keadm", *era_argv("B", root)], root)
    assert result.returncode == 0, result.stderr
    assert edgecore_pid(root) is None
    assert run([root / BINARY, "--version"]).stdout == f"KubeEdge {NEW}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["upgrade", "edge", "--force", "--toVersion", NEW, "--xyz"], "unknown flag: --xyz"),
        (["upgrade", "edge", "--force", "--toVersion", NEW, "--xyz=1"], "unknown flag: --xyz"),
        (["upgrade", "--force", "--toVersion", NEW], "unknown flag: --force"),
        (["upgrade", "edge", "--force"], 'required flag(s) "toVersion" not set'),
        (["upgrade", "edge", "--toVersion", NEW], "refusing to prompt without a terminal"),
        (["upgrade", "edge", "--force", "--toVer", NEW], "unknown flag: --toVer"),
    ],
)
def test_keadm_rejects_bad_invocations(
    new_node: NodeFactory, tmp_path: Path, argv: list[str], message: str
) -> None:
    root = new_node()
    keadm = write_keadm(tmp_path / "bin" / "keadm", NEW)
    write_edgecore(tmp_path / "bin" / "edgecore", NEW)
    binary = (root / BINARY).read_bytes()
    result = run([keadm, *argv], root)
    assert result.returncode == 1
    assert f"Error: {message}" in result.stderr
    assert (root / BINARY).read_bytes() == binary
    assert not (root / LOCK).exists()


def test_keadm_version_and_argv_log(tmp_path: Path) -> None:
    keadm = write_keadm(tmp_path / "keadm", NEW)
    log = tmp_path / "argv.jsonl"
    env = {**os.environ, "KEADM_STANDIN_ARGV_LOG": str(log)}
    result = subprocess.run(
        [str(keadm), "version"], capture_output=True, text=True, env=env, check=False
    )
    assert (result.returncode, result.stdout) == (0, f"version: {NEW}\n")
    assert json.loads(log.read_text()) == ["version"]


def test_keadm_refuses_existing_lock(new_node: NodeFactory, tmp_path: Path) -> None:
    root = new_node()
    (root / LOCK).write_text("12345\n")
    binary = (root / BINARY).read_bytes()
    image = make_image_dir(tmp_path / "images", REPO, NEW)
    result = run([image / "usr/local/bin/keadm", *era_argv("C", root)], root)
    assert result.returncode == 1
    assert "Error: last upgrade not finished" in result.stderr
    assert (root / LOCK).read_text() == "12345\n"
    assert (root / BINARY).read_bytes() == binary


def test_keadm_hang_needs_group_kill(new_node: NodeFactory, tmp_path: Path) -> None:
    root = new_node()
    image = make_image_dir(tmp_path / "images", REPO, NEW, keadm_behaviour="hang")
    env = {**os.environ, "EDGE_UPGRADE_ROOT": str(root)}
    argv = [str(image / "usr/local/bin/keadm"), *map(str, era_argv("C", root))]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        line = ""
        while "child pid" not in line:
            line = proc.stdout.readline()
            assert line, "keadm exited before spawning its child"
        child = int(line.rsplit(" ", 1)[1].rstrip(")\n"))
        assert process_running(child)
        assert (root / LOCK).exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    wait_until(lambda: not process_running(child))


def test_metaserver_serves_kubelet_version(new_node: NodeFactory) -> None:
    port = free_port()
    root = new_node(version=NEW, node_name="edge-7", metaserver_port=port)
    start_edgecore(root)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as resp:
                return bool(resp.read() == b"ok")
        except OSError:
            return False

    wait_until(healthy)
    with urllib.request.urlopen(f"{base}/api/v1/nodes/edge-7", timeout=1) as resp:
        node = json.loads(resp.read())
    assert node["metadata"]["name"] == "edge-7"
    assert node["status"]["nodeInfo"]["kubeletVersion"] == f"v1.22.17-kubeedge-{NEW}"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{base}/api/v1/nodes/other", timeout=1)
