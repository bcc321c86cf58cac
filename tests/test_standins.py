"""The keadm/edgecore stand-ins: what the agent's tests assume, held against the real binaries.

The real edgecore and keadm (v1.12.1, v1.13.0; ../shared/kubeedge) run the same
probes as the stand-ins wherever that is safe on a test machine: no version flag
(``--version`` starts edgecore), the klog ``Version:`` line first, the one bare
version literal, keadm's Era A flags and help. keadm's upgrade itself needs
/etc/kubeedge, a container runtime and systemd, so its file effects (its own
backup, the unit rewrite, the idempotency record) are checked on the stand-in
in a sandbox, as read from the v1.13.0/v1.20.0 sources and observed with
v1.13.0.
"""

import json
import os
import re
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
import yaml

from agent.adapters.edgecore import embedded_versions
from agent.adapters.keadm import InstallSpec, keadm_argv
from agent.versions import ImageRef, Version
from testkit.kubeedge_real import VERSIONS, minconfig, require_real_binary
from testkit.standins import (
    edgecore_pid,
    logged_version,
    make_image_dir,
    make_node,
    start_edgecore,
    stop_edgecore,
    write_edgecore,
    write_keadm,
)

OLD = "v1.12.0"
NEW = "v1.13.0"
ERA_KEADM = {"A": NEW, "B": "v1.20.0", "C": "v1.23.1"}
REPO = "registry.local:5000/kubeedge/installation-package"
CONFIG = Path("etc/kubeedge/config/edgecore.yaml")
LOCK = Path("etc/kubeedge/idempotency_record")
BINARY = Path("usr/local/bin/edgecore")
DB = Path("var/lib/kubeedge/edgecore.db")
UNIT = Path("etc/systemd/system/edgecore.service")
BACKUP = Path("etc/kubeedge/backup")
DEFAULT_CONFIG = Path("/etc/kubeedge/config/edgecore.yaml")
OPERATOR_UNIT = """[Unit]
Description=edgecore (operator's own)
[Service]
ExecStart=/usr/local/bin/edgecore --config /etc/kubeedge/config/edgecore.yaml
Environment=SITE=1
Restart=always
RestartSec=1
KillMode=process
[Install]
WantedBy=multi-user.target
"""
# The first line every edgecore logs: klog header (severity, MMDD, time, pid in
# 7 columns, file:line) and the version.
VERSION_LINE = re.compile(
    r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} (?P<pid>[ \d]{7}) server\.go:\d+\] "
    r"Version: (?P<version>v\d+\.\d+\.\d+\S*)$"
)
KLOG_HEADER = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d{6} (?P<pid>[ \d]{7}) ")
ERA_A_FLAGS = {"upgradeID", "historyID", "fromVersion", "toVersion", "config", "image"}

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


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts itself; killed (with their group) afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def run(argv: list[str | Path], root: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    if root is not None:
        full["EDGE_UPGRADE_ROOT"] = str(root)
    full.update(env or {})
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, env=full, timeout=20,
        check=False, stdin=subprocess.DEVNULL,
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


def test_bare_versions_is_the_bounded_regex(tmp_path: Path) -> None:
    bounded = re.compile(rb"(?<![\x20-\x7e\t])v\d+\.\d+\.\d+(?![\x20-\x7e\t])")
    sample = (b"v1.0.0\x00go1.19 v1.2.3\x00\x01v1.13.0\x00v2.3.45x\tv3.4.5\nv1.2.3v4.5.6\x00"
              b"\xffv10.20.30")
    path = tmp_path / "sample"
    path.write_bytes(sample)
    expected = [m.decode() for m in bounded.findall(sample)]
    assert embedded_versions(path) == expected == ["v1.0.0", "v1.13.0", "v10.20.30"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def era_argv(era: str, root: Path, *, from_version: str = OLD) -> list[str | Path]:
    common: list[str | Path] = ["--toVersion", NEW, "--config", root / CONFIG]
    ids: list[str | Path] = ["--upgradeID", "u1", "--historyID", "h1",
                             "--fromVersion", from_version]
    if era == "A":
        return ["upgrade", *ids, *common, "--image", f"{REPO}:{NEW}"]
    if era == "B":
        return ["upgrade", "edge", *ids, *common, "--image", f"{REPO}:{NEW}", "--type", "upgrade"]
    return ["upgrade", "edge", "--force", *common, "--image", REPO,
            "--image-digest", "sha256:abc"]


def era_image(tmp_path: Path, era: str, **kwargs: Any) -> Path:
    """An image whose keadm is of ``era``; its edgecore is NEW whatever the era."""
    image = make_image_dir(tmp_path / "images", REPO, NEW, **kwargs)
    keadm = image / "usr/local/bin/keadm"
    write_keadm(keadm, ERA_KEADM[era], behaviour=kwargs.get("keadm_behaviour", "ok"))
    return keadm


def first_line(path: Path, timeout: float = 10.0) -> str:
    wait_until(lambda: path.exists() and b"\n" in path.read_bytes(), timeout)
    return path.read_bytes().split(b"\n", 1)[0].decode()


def normalise_klog(text: str, pid: int) -> str:
    """A klog text with its headers' time and pid replaced, after checking the pid."""
    out = []
    for line in text.splitlines():
        m = KLOG_HEADER.match(line)
        if m:
            assert int(m["pid"]) == pid, line
        out.append(f"{m[1]}<time> <pid> " + line[m.end():] if m else line)
    return "\n".join(out)


def real_config(version: str, tmp_path: Path) -> Path:
    """That version's minconfig, made to run here: own DB, no edged, no cloud."""
    source = minconfig(version)
    assert source is not None
    config = yaml.safe_load(source.read_text())
    config["database"]["dataSource"] = str(tmp_path / "real-edgecore.db")
    config["modules"]["edged"]["enable"] = False
    config["modules"]["edgeHub"]["enable"] = False
    path = tmp_path / "real-edgecore.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_logged(argv: list[str | Path], stderr: Path,
                 procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    with stderr.open("wb") as err:
        proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    procs.append(proc)
    return proc


# -- edgecore: the stand-in against the real binary --------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_edgecore_bare_version_literal_like_real(version: str, tmp_path: Path) -> None:
    for name in ("edgecore", "keadm"):
        assert embedded_versions(require_real_binary(version, name)) == [version]
    standin = write_edgecore(tmp_path / "edgecore", version)
    assert embedded_versions(standin) == [version]
    assert embedded_versions(write_keadm(tmp_path / "keadm", version)) == [version]
    # The VERSION constant is there too, but quoted: not a bare literal.
    assert f"VERSION = '{version}'" in standin.read_text()


@pytest.mark.skipif(DEFAULT_CONFIG.exists(), reason=f"{DEFAULT_CONFIG} exists on this machine")
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("args", "config"), [
    (["--version"], str(DEFAULT_CONFIG)),
    (["--config", "/nonexistent/edgecore.yaml"], "/nonexistent/edgecore.yaml"),
    (["--version=true", "--config=/nonexistent/x.yaml", "extra"], "/nonexistent/x.yaml"),
])
def test_edgecore_without_config_exits_like_real(version: str, args: list[str], config: str,
                                                 tmp_path: Path) -> None:
    """`edgecore --version` is no version query: it tries to start, on the default config."""
    real = require_real_binary(version, "edgecore")
    standin = write_edgecore(tmp_path / "edgecore", version)
    results = []
    for binary in (real, standin):
        proc = subprocess.Popen([str(binary), *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = proc.communicate(timeout=20)
        results.append((proc.returncode, stdout.decode(),
                        normalise_klog(stderr.decode(), proc.pid)))
    assert results[1] == results[0]
    rc, out, err = results[0]
    assert (rc, out) == (1, "")
    assert err.startswith("F<time> ")
    assert f"config file {config} not exist." in err
    assert version not in err


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("args", [["--bogus"], ["--config"], ["--version=maybe"], ["-x"]])
def test_edgecore_flag_errors_like_real(version: str, args: list[str], tmp_path: Path) -> None:
    real = require_real_binary(version, "edgecore")
    standin = write_edgecore(tmp_path / "edgecore", version)
    seen = []
    for binary in (real, standin):
        r = run([binary, *args])
        seen.append((r.returncode, r.stdout, r.stderr.splitlines()[:3]))
    assert seen[1] == seen[0]
    assert seen[0][0] == 1 and seen[0][1] == ""
    assert seen[0][2][0].startswith("Error: ")


@pytest.mark.parametrize("version", VERSIONS)
def test_edgecore_version_flag_starts_it_like_real(
    version: str, tmp_path: Path, new_node: NodeFactory, procs: list[subprocess.Popen[bytes]]
) -> None:
    real = require_real_binary(version, "edgecore")
    root = new_node(version=version)
    configs = [real_config(version, tmp_path), root / CONFIG]
    before = [c.read_bytes() for c in configs]
    running = [
        start_logged([real, "--config", configs[0], "--version"], tmp_path / "real.err", procs),
        start_logged([root / BINARY, "--config", configs[1], "--version"],
                     tmp_path / "standin.err", procs),
    ]
    for proc, err in zip(running, ("real.err", "standin.err"), strict=True):
        line = first_line(tmp_path / err)
        m = VERSION_LINE.match(line)
        assert m is not None, line
        assert (int(m["pid"]), m["version"]) == (proc.pid, version)
        assert f" {proc.pid:7d} server.go:" in line  # klog's pid column, right-aligned
    time.sleep(0.5)
    assert [p.poll() for p in running] == [None, None], "both must have started and stayed up"
    for proc, err in zip(running, ("real.err", "standin.err"), strict=True):
        proc.terminate()
        proc.wait(10)
        # The version is logged once: in the first line, nowhere else.
        assert (tmp_path / err).read_text().count(version) == 1
    # Before v1.21 edgecore never rewrites its config (v1.21+ stand-ins do, as observed).
    assert [c.read_bytes() for c in configs] == before


def test_edgecore_logs_version_only_in_its_first_line(new_node: NodeFactory) -> None:
    root = new_node(version=NEW)
    pid = start_edgecore(root)
    wait_until(lambda: "started" in log_text(root))
    stop_edgecore(root)
    lines = log_text(root).splitlines()
    assert VERSION_LINE.match(lines[0]) and logged_version(root, pid) == NEW
    assert all(NEW not in line for line in lines[1:])
    assert all(KLOG_HEADER.match(line) for line in lines)


# -- keadm: flags against the real binary --------------------------------------------------


def help_flags(text: str) -> set[str]:
    return set(re.findall(r"^\s+(?:-\w, )?--([\w-]+)", text.partition("Flags:")[2], re.M))


@pytest.mark.parametrize("version", VERSIONS)
def test_keadm_era_a_flags_like_real(version: str, tmp_path: Path) -> None:
    real = require_real_binary(version, "keadm")
    standin = write_keadm(tmp_path / "keadm", version)
    real_help, standin_help = run([real, "upgrade", "--help"]), run([standin, "upgrade", "--help"])
    assert (real_help.returncode, standin_help.returncode) == (0, 0)
    assert standin_help.stdout == real_help.stdout
    assert help_flags(real_help.stdout) == ERA_A_FLAGS | {"help"}
    # The argv the agent builds for an Era A target uses exactly those flags...
    spec = InstallSpec(standin, Version.parse("v1.12.1"), Version.parse(version),
                       ImageRef(REPO), tmp_path / "edgecore.yaml", "job-1", "h-1")
    agent_argv = keadm_argv(spec)
    assert agent_argv[1] == "upgrade"
    assert {a[2:] for a in agent_argv if a.startswith("--")} == ERA_A_FLAGS
    # ... and both keadms parse it (--help: parse the flags, then do nothing).
    for binary in (real, standin):
        r = run([binary, *agent_argv[1:], "--help"])
        assert (r.returncode, r.stdout) == (0, real_help.stdout)
    # An unknown flag: the same error, on the same streams, with the same exit code.
    seen = []
    for binary in (real, standin):
        r = run([binary, "upgrade", "--force", "--toVersion", version])
        seen.append((r.returncode, r.stdout, r.stderr.splitlines()[:3]))
    assert seen[1] == seen[0] == (
        1, "execute keadm command failed:  unknown flag: --force\n",
        ["Error: unknown flag: --force", "Usage:", "  keadm upgrade [flags]"])


# -- edgecore stand-in in a sandbox ------------------------------------------------------


def test_script_shape(tmp_path: Path) -> None:
    edgecore = write_edgecore(tmp_path / "a" / "edgecore", NEW)
    assert edgecore.stat().st_mode & 0o777 == 0o755
    assert edgecore.read_text().splitlines()[0] == f"#!{sys.executable}"
    assert "VERSION_FLAG =" not in edgecore.read_text()
    with pytest.raises(ValueError, match="bad stand-in version"):
        write_edgecore(tmp_path / "b" / "edgecore", 'v1.13.0"""')


def test_start_stop_does_not_touch_db_of_same_version(new_node: NodeFactory) -> None:
    root = new_node()
    db_before = (root / DB).read_bytes()
    pid = start_edgecore(root)
    assert edgecore_pid(root) == pid
    wait_until(lambda: "started" in log_text(root))
    assert logged_version(root, pid) == OLD
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
    pid = start_edgecore(root)
    wait_until(lambda: edgecore_pid(root) is None)
    assert "simulated crash" in log_text(root)
    assert logged_version(root, pid) == NEW  # it did start, and said so first


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


# -- keadm stand-in in a sandbox -----------------------------------------------------------


@pytest.mark.parametrize("era", ["A", "B", "C"])
def test_keadm_ok_upgrade(new_node: NodeFactory, tmp_path: Path, era: str) -> None:
    root = new_node(config_version_field=True)
    old_pid = start_edgecore(root)
    keadm = era_image(tmp_path, era)
    result = run([keadm, *era_argv(era, root)], root)
    assert result.returncode == 0, result.stderr
    assert "finished" in result.stdout
    assert embedded_versions(root / BINARY) == [NEW]
    new_pid = edgecore_pid(root)
    assert new_pid is not None and new_pid != old_pid
    assert not process_running(old_pid)
    wait_until(lambda: logged_version(root, new_pid) == NEW)
    wait_until(lambda: db_version(root) == NEW)
    assert not (root / LOCK).exists()
    assert not (root / "usr/local/bin/.edgecore.new").exists()
    assert (root / BACKUP).exists() == (era != "C")
    if era != "C":
        # Its report to the cloud fails (no CA), and it still exits 0.
        assert "failed to report upgrade result to cloud: failed to read ca" in result.stderr
        assert (root / "etc/kubeedge/upgrade" / NEW / "edgecore").read_bytes() == \
            (root / BINARY).read_bytes()


@pytest.mark.parametrize("era", ["A", "B"])
def test_keadm_writes_its_own_backup_while_edgecore_runs(
    new_node: NodeFactory, tmp_path: Path, era: str
) -> None:
    root = new_node()
    pid = start_edgecore(root)
    wait_until(lambda: "started" in log_text(root))
    backup = root / BACKUP / OLD
    backup.mkdir(parents=True)
    (backup / "edgecore.db").write_bytes(b"an earlier, longer backup " * 10_000)
    (backup / "edgecore.db").chmod(0o600)
    (backup / "manifest.json").write_text("{}")
    originals = {name: (root / path).read_bytes() for name, path in
                 (("edgecore.db", DB), ("edgecore.yaml", CONFIG), ("edgecore", BINARY))}
    keadm = era_image(tmp_path, era, keadm_behaviour="fail")  # fails at the pull, after backup
    result = run([keadm, *era_argv(era, root)], root)
    assert result.returncode == 1
    assert "Error: upgrade pre process failed: pull image failed:" in result.stderr
    assert edgecore_pid(root) == pid  # backed up live, never stopped
    assert {p.name for p in backup.iterdir()} == {*originals, "manifest.json"}
    for name, data in originals.items():
        assert (backup / name).read_bytes() == data, name  # overwritten in place
    assert (backup / "edgecore.db").stat().st_mode & 0o777 == 0o600
    assert (backup / "edgecore").stat().st_mode & 0o777 == 0o755
    assert (backup / "manifest.json").read_text() == "{}"
    assert not (root / LOCK).exists()


def test_keadm_era_b_disable_backup(new_node: NodeFactory, tmp_path: Path) -> None:
    root = new_node()
    start_edgecore(root)
    keadm = era_image(tmp_path, "B")
    result = run([keadm, *era_argv("B", root), "--disable-backup"], root)
    assert result.returncode == 0, result.stderr
    assert not (root / BACKUP).exists()


@pytest.mark.parametrize(("era", "extra"), [
    ("A", ""),
    ("B", 'Environment="DEPLOY_MQTT_CONTAINER=false"\nKillMode=process\n'),
    ("C", None),
])
def test_keadm_rewrites_the_unit_file(new_node: NodeFactory, tmp_path: Path, era: str,
                                      extra: str | None) -> None:
    root = new_node()
    start_edgecore(root)
    (root / UNIT).parent.mkdir(parents=True)
    (root / UNIT).write_text(OPERATOR_UNIT)
    keadm = era_image(tmp_path, era)
    result = run([keadm, *era_argv(era, root)], root)
    assert result.returncode == 0, result.stderr
    if extra is None:
        assert (root / UNIT).read_text() == OPERATOR_UNIT  # Era C keeps the unit
        return
    # keadm's own template: the operator's Environment=, KillMode= and RestartSec are gone.
    assert (root / UNIT).read_text() == (
        "[Unit]\nDescription=edgecore.service\n\n[Service]\nType=simple\n"
        f"ExecStart=/usr/local/bin/edgecore --config {root / CONFIG}\n"
        f"Restart=always\nRestartSec=10\n{extra}\n[Install]\nWantedBy=multi-user.target\n")


def test_keadm_leaves_no_unit_where_there_was_none(new_node: NodeFactory,
                                                   tmp_path: Path) -> None:
    root = new_node()
    start_edgecore(root)
    result = run([era_image(tmp_path, "A"), *era_argv("A", root)], root)
    assert result.returncode == 0, result.stderr
    assert not (root / UNIT).exists()


def test_keadm_fail_leaves_node_untouched(new_node: NodeFactory, tmp_path: Path) -> None:
    root = new_node()
    pid = start_edgecore(root)
    wait_until(lambda: "started" in log_text(root))
    binary, db = (root / BINARY).read_bytes(), (root / DB).read_bytes()
    keadm = era_image(tmp_path, "C", keadm_behaviour="fail")
    result = run([keadm, *era_argv("C", root)], root)
    assert result.returncode == 1
    assert f"Error: failed to pull image {REPO}:{NEW}: simulated" in result.stderr
    assert edgecore_pid(root) == pid
    assert (root / BINARY).read_bytes() == binary
    assert (root / DB).read_bytes() == db
    assert not (root / LOCK).exists()


def test_keadm_fail_after_stop_half_installs(new_node: NodeFactory, tmp_path: Path) -> None:
    root = new_node()
    start_edgecore(root)
    keadm = era_image(tmp_path, "C", keadm_behaviour="fail-after-stop")
    result = run([keadm, *era_argv("C", root)], root)
    assert result.returncode == 1
    assert edgecore_pid(root) is None
    assert (root / BINARY).stat().st_size == 0
    assert not (root / LOCK).exists()


def test_keadm_ok_no_restart(new_node: NodeFactory, tmp_path: Path) -> None:
    root = new_node()
    start_edgecore(root)
    keadm = era_image(tmp_path, "B", keadm_behaviour="ok-no-restart")
    result = run([keadm, *era_argv("B", root), "--disable-backup"], root)
    assert result.returncode == 0, result.stderr
    assert edgecore_pid(root) is None
    assert embedded_versions(root / BINARY) == [NEW]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["upgrade", "edge", "--force", "--toVersion", NEW, "--xyz"], "unknown flag: --xyz"),
        (["upgrade", "edge", "--force", "--toVersion", NEW, "--xyz=1"], "unknown flag: --xyz"),
        (["upgrade", "--force", "--toVersion", NEW], "unknown flag: --force"),
        (["upgrade", "--disable-backup"], "unknown flag: --disable-backup"),
        (["upgrade", "edge", "--force", "--toVer", NEW], "unknown flag: --toVer"),
        (["upgrade", "--toVersion"], "flag needs an argument: --toVersion"),
        (["install"], 'unknown command "install" for "keadm"'),
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
    assert result.stdout.startswith("execute keadm command failed:  ")
    assert (root / BINARY).read_bytes() == binary
    assert not (root / LOCK).exists()


def test_keadm_era_c_without_force_asks_and_aborts(new_node: NodeFactory,
                                                  tmp_path: Path) -> None:
    root = new_node()
    pid = start_edgecore(root)
    binary = (root / BINARY).read_bytes()
    keadm = era_image(tmp_path, "C")
    result = run([keadm, "upgrade", "edge", "--toVersion", NEW, "--config", root / CONFIG], root)
    assert result.returncode == 0  # stdin closed: no "y", nothing done, and still 0
    assert "Are you sure you want to proceed? [y/N]: " in result.stdout
    assert "aborted upgrade operation" in result.stderr
    assert (root / BINARY).read_bytes() == binary and edgecore_pid(root) == pid


def test_keadm_era_a_default_to_version(new_node: NodeFactory, tmp_path: Path) -> None:
    root = new_node()
    keadm = write_keadm(tmp_path / "bin" / "keadm", NEW)
    write_edgecore(tmp_path / "bin" / "edgecore", NEW)
    result = run([keadm, "upgrade", "--fromVersion", OLD, "--config", root / CONFIG], root)
    assert result.returncode == 0, result.stderr
    assert "upgrade to v1.12.0 finished" in result.stdout  # keadm v1.13.0's stale default


def test_keadm_version_and_argv_log(tmp_path: Path) -> None:
    keadm = write_keadm(tmp_path / "keadm", NEW)
    log = tmp_path / "argv.jsonl"
    result = run([keadm, "version"], env={"KEADM_STANDIN_ARGV_LOG": str(log)})
    assert result.returncode == 0
    assert result.stdout.startswith(f'version: version.Info{{Major:"1", Minor:"13", '
                                    f'GitVersion:"{NEW}", ')
    assert json.loads(log.read_text()) == ["version"]


@pytest.mark.parametrize("era", ["A", "B", "C"])
def test_keadm_refuses_existing_lock(new_node: NodeFactory, tmp_path: Path, era: str) -> None:
    root = new_node()
    (root / LOCK).write_text("12345\n")
    binary = (root / BINARY).read_bytes()
    result = run([era_image(tmp_path, era), *era_argv(era, root)], root)
    assert result.returncode == 1
    assert (root / BINARY).read_bytes() == binary
    if era == "C":
        assert "Error: the mutually exclusive command is being executed" in result.stderr
        assert (root / LOCK).read_text() == "12345\n"
    else:
        assert "Error: last upgrade not finished, not allowed upgrade again" in result.stderr
        # v1.12-v1.20 remove the record in a deferred cleanup, even one they refused on.
        assert not (root / LOCK).exists()
        assert not (root / BACKUP).exists()


def test_keadm_hang_needs_group_kill(new_node: NodeFactory, tmp_path: Path) -> None:
    root = new_node()
    keadm = era_image(tmp_path, "C", keadm_behaviour="hang")
    env = {**os.environ, "EDGE_UPGRADE_ROOT": str(root)}
    argv = [str(keadm), *map(str, era_argv("C", root))]
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
