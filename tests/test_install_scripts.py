"""The install path (issue 5): the unit, its CI check, install/uninstall and the wheelhouse.

The scripts run as an operator would run them, as real processes. Installs go
into a temporary ``--root`` (which implies ``--no-start``), so nothing on the
machine changes. The wheelhouse is built once per session by
``scripts/build-wheelhouse.sh`` (that needs PyPI or the configured mirror);
the install from it then runs with every pip index switched off and the
network proxied to a closed port, so it proves the air-gapped path.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from agent import __version__
from testkit.pki import make_pki

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
UNIT = REPO / "systemd" / "edge-upgrade-agent.service"
AGENT_BIN = "/opt/edge-upgrade-agent/venv/bin/edge-upgrade-agent"


def run(argv: Sequence[str | Path], env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def offline_env() -> dict[str, str]:
    """pip with no index, no configured find-links, and no way out."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k.lower() not in ("http_proxy", "https_proxy",
                                                              "no_proxy", "all_proxy")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    return env


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values, in order (systemd allows repeated keys)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(section, {}).setdefault(key, []).append(value)
    return out


def need_systemd_analyze() -> None:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing on CI (apt-get install systemd)")
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd)")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the unit and check-unit.sh ------------------------------------------------


def test_unit_has_the_settings_issue_5_relies_on() -> None:
    s = unit_settings(UNIT.read_text())
    unit, service = s["Unit"], s["Service"]
    assert unit["StartLimitIntervalSec"] == ["0"]  # never left dead (Mender integration#2944)
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30s",
        "Restart": "on-failure", "RestartSec": "5s", "TimeoutStopSec": "60s",
        "KillMode": "mixed", "StateDirectory": "edge-upgrade-agent",
        "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
        "NoNewPrivileges": "yes", "UMask": "0027",
        "SystemCallFilter": "@system-service",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "ExecStart": f"{AGENT_BIN} run --config /etc/edge-upgrade-agent/agent.yaml",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], key
    # What keadm writes must stay writable under ProtectSystem=strict.
    rw = service["ReadWritePaths"][0].split()
    assert {p.lstrip("-") for p in rw} >= {"/usr/local/bin", "/etc/kubeedge",
                                           "/var/lib/kubeedge", "/etc/systemd/system"}
    # The credential is optional: SetCredential= of the same ID makes a missing file non-fatal.
    assert service["LoadCredential"] == ["registry:/etc/edge-upgrade-agent/credentials/registry"]
    assert [v.split(":", 1)[0] for v in service["SetCredential"]] == ["registry"]


def test_scripts_agree_on_the_install_location() -> None:
    check = (SCRIPTS / "check-unit.sh").read_text()
    assert f"AGENT_BIN={AGENT_BIN}\n" in check
    assert "DEFAULT_PREFIX=/opt/edge-upgrade-agent\n" in (SCRIPTS / "install.sh").read_text()
    assert re.search(r"^THRESHOLD=\d+\.\d$", check, re.M)


def test_check_unit_passes() -> None:
    need_systemd_analyze()
    r = run([SCRIPTS / "check-unit.sh"], timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify edge-upgrade-agent.service: clean" in r.stdout
    assert re.search(r"exposure \d+\.\d \(threshold \d+\.\d\)", r.stdout), r.stdout


@pytest.mark.parametrize(("change", "expected"), [
    # verify exits 0 on these two, yet prints a warning: check-unit must fail.
    (("Type=notify\n", "Type=notify\nBogus=1\n"), "Unknown key 'Bogus'"),
    (("WatchdogSec=30s\n", "WatchdogSec=thirty\n"), "Failed to parse"),
    # ExecStart pointing anywhere but where install.sh puts the agent.
    ((f"{AGENT_BIN} run", f"{AGENT_BIN}-typo run"), "is not executable"),
    # A weaker sandbox raises the exposure score above the documented figure.
    (("ProtectHome=yes\n", ""), "is above the documented"),
], ids=["unknown-key", "bad-value", "wrong-execstart", "weaker-sandbox"])
def test_check_unit_fails_on_a_broken_unit(tmp_path: Path, change: tuple[str, str],
                                           expected: str) -> None:
    need_systemd_analyze()
    old, new = change
    text = UNIT.read_text()
    assert text.count(old) == 1
    broken = tmp_path / UNIT.name
    broken.write_text(text.replace(old, new))
    r = run([SCRIPTS / "check-unit.sh", broken], timeout=60)
    assert r.returncode != 0, r.stdout + r.stderr
    assert expected in r.stderr, r.stderr


# -- install.sh argument checks (fast: nothing is built) -----------------------


@pytest.mark.parametrize("args", [
    ["--broker", "broker.test:8883"],                      # mqtt without TLS files
    ["--ca", "FILE"],                                      # TLS files without --broker
    ["--node-name", "Not_A_Name"],
    ["--prefix", "opt/relative"],
    ["--prefix", "/opt/with space"],
    ["--wheelhouse", "/nonexistent/wheelhouse"],
    ["--broker", "broker.test:99999", "--ca", "FILE", "--cert", "FILE", "--key", "FILE"],
    ["--broker", "broker.test:8883", "--ca", "FILE", "--cert", "FILE", "--key", "/nonexistent"],
    ["--no-such-option"],
    ["--node-name"],
])
def test_install_rejects_bad_usage_before_touching_anything(tmp_path: Path,
                                                            args: list[str]) -> None:
    root = tmp_path / "root"
    pem = tmp_path / "some.pem"
    pem.write_text("not checked this early\n")
    args = [str(pem) if a == "FILE" else a for a in args]
    r = run([SCRIPTS / "install.sh", "--root", root, *args], timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert not root.exists() or not any(root.iterdir())


# -- the real thing ---------------------------------------------------------------


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    r = run([SCRIPTS / "build-wheelhouse.sh", out], timeout=300)
    assert r.returncode == 0, f"build-wheelhouse.sh (needs PyPI or a mirror):\n{r.stderr}"
    assert list(out.glob("edge_upgrade_agent-*.whl")), sorted(p.name for p in out.iterdir())
    assert (out / "SHA256SUMS").is_file()
    return out


@pytest.mark.slow
def test_offline_install_is_idempotent_and_uninstalls(tmp_path: Path, wheelhouse: Path) -> None:
    root = tmp_path / "root"
    pki = make_pki(tmp_path / "pki", ["edge-7"])
    cert, key = pki.client("edge-7")
    install: list[str | Path] = [SCRIPTS / "install.sh", "--root", root,
                                 "--wheelhouse", wheelhouse]
    tls_args: list[str | Path] = ["--ca", pki.ca_cert, "--cert", cert, "--key", key]
    r = run([*install, "--node-name", "edge-7", "--broker", "broker.test:18883", *tls_args],
            env=offline_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not starting the service" in r.stdout  # --root implies --no-start
    assert "WARNING" not in r.stderr  # the certificate's CN is the node name

    unit = root / "etc/systemd/system/edge-upgrade-agent.service"
    assert unit.read_text() == UNIT.read_text()
    assert mode(unit) == 0o644

    conf = root / "etc/edge-upgrade-agent/agent.yaml"
    text = conf.read_text()
    data = yaml.safe_load(text)
    assert data["node_name"] == "edge-7"
    mqtt = data["transport"]["mqtt"]
    assert data["transport"]["kind"] == "mqtt"
    assert (mqtt["host"], mqtt["port"]) == ("broker.test", 18883)
    assert "# Every key is optional" in text  # the sample's comments are kept
    assert mode(conf) == 0o640

    tls = root / "etc/edge-upgrade-agent/tls"
    assert (tls / "ca.crt").read_bytes() == pki.ca_cert.read_bytes()
    assert (tls / "node.crt").read_bytes() == cert.read_bytes()
    assert (tls / "node.key").read_bytes() == key.read_bytes()
    assert mode(tls / "node.key") == 0o600
    assert mode(tls) == 0o700
    assert mode(root / "etc/edge-upgrade-agent/credentials") == 0o700

    agent = root / AGENT_BIN.lstrip("/")
    r = run([agent, "--version"], timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == f"edge-upgrade-agent {__version__}", r

    # Re-run: upgrades the agent in place, replaces the unit, keeps the config.
    conf.write_text(text + "# operator's own line\n")
    before = conf.read_bytes()
    unit.write_text("[Unit]\nDescription=stale\n")
    r = run([*install, "--node-name", "other-node", "--broker", "other.test:1883", *tls_args],
            env=offline_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reusing" in r.stdout and "kept the existing" in r.stdout
    assert "not applied" in r.stdout and "--node-name --broker" in r.stdout
    assert conf.read_bytes() == before
    assert unit.read_text() == UNIT.read_text()
    assert run([agent, "--version"], timeout=30).returncode == 0

    # uninstall keeps configuration and state; --purge removes them, never /etc/kubeedge.
    state = root / "var/lib/edge-upgrade-agent"
    state.mkdir(parents=True)
    (state / "journal.db").write_bytes(b"x")
    backup = state / "backups/v1.12.1"
    backup.mkdir(parents=True)
    kubeedge = root / "etc/kubeedge/backup/v1.12.1"
    kubeedge.mkdir(parents=True)
    r = run([SCRIPTS / "uninstall.sh", "--root", root], timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not unit.exists() and not (root / "opt/edge-upgrade-agent").exists()
    assert conf.read_bytes() == before and (state / "journal.db").exists()
    r = run([SCRIPTS / "uninstall.sh", "--root", root, "--purge"], timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (root / "etc/edge-upgrade-agent").exists()
    assert not (state / "journal.db").exists() and backup.is_dir() and kubeedge.is_dir()
    # Nothing left to remove is not an error.
    assert run([SCRIPTS / "uninstall.sh", "--root", root, "--purge"], timeout=30).returncode == 0


@pytest.mark.slow
def test_install_from_the_source_tree_with_a_prefix(tmp_path: Path) -> None:
    root = tmp_path / "root"
    had_build_dir = (REPO / "build").exists()
    r = run([SCRIPTS / "install.sh", "--root", root, "--prefix", "/srv/eua",
             "--node-name", "edge-8"], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    unit = unit_settings((root / "etc/systemd/system/edge-upgrade-agent.service").read_text())
    assert unit["Service"]["ExecStart"] == [
        "/srv/eua/venv/bin/edge-upgrade-agent run --config /etc/edge-upgrade-agent/agent.yaml"]
    data = yaml.safe_load((root / "etc/edge-upgrade-agent/agent.yaml").read_text())
    assert data["node_name"] == "edge-8" and data["transport"]["kind"] == "spool"
    r = run([root / "srv/eua/venv/bin/edge-upgrade-agent", "--version"], timeout=30)
    assert r.returncode == 0, r.stderr
    # pip built from a copy: no build/ left in the source tree.
    assert (REPO / "build").exists() == had_build_dir
