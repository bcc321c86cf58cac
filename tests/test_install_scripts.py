"""The install path (issue 5): the unit, its CI check, install/uninstall and the wheelhouse.

The scripts run as an operator would run them, as real processes. Installs go
into a temporary ``--root`` (which implies ``--no-start``), so nothing on the
machine changes. The wheelhouse is built once per session by
``scripts/build-wheelhouse.sh`` (that needs PyPI or the configured mirror);
the install from it then runs with every pip index switched off and the
network proxied to a closed port, so it proves the air-gapped path.

Issue 15: an arm64 bundle is built once per module on whatever this host is
(pip's cross-platform download), checked wheel by wheel, and refused by
install.sh on a host it was not made for, as are damaged bundles, before
anything is created. pip's downloads are cached in /var/tmp, keyed by
pyproject.toml, so a rerun fetches (almost) nothing.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from agent import __version__
from testkit.pki import make_pki

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
UNIT = REPO / "systemd" / "edge-upgrade-agent.service"
AGENT_BIN = "/opt/edge-upgrade-agent/venv/bin/edge-upgrade-agent"
# What install.sh calls this host (uname -m) and the Python it is run with here.
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
HOST_PY = f"{sys.version_info.major}.{sys.version_info.minor}"


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


# Wheels of earlier builds, keyed by the dependencies: a find-links directory,
# so pip still asks the index for the newest versions but copies the files it
# already has instead of downloading them. (pip's own HTTP cache, also kept
# here, stores nothing behind a proxy that drops Cache-Control.)
WHEEL_CACHE = Path("/var/tmp") / ("edge-upgrade-agent-wheels-"
                                  + hashlib.sha256((REPO / "pyproject.toml").read_bytes())
                                  .hexdigest()[:16])


def build_env() -> dict[str, str]:
    """The caller's pip settings, plus the wheel cache."""
    WHEEL_CACHE.mkdir(exist_ok=True)
    links = " ".join(filter(None, [str(WHEEL_CACHE), os.environ.get("PIP_FIND_LINKS")]))
    return {**os.environ, "PIP_FIND_LINKS": links, "PIP_CACHE_DIR": str(WHEEL_CACHE / "http")}


def build_bundles(args: Sequence[str | Path]) -> subprocess.CompletedProcess[str]:
    """Run build-wheelhouse.sh; on success, keep its dependency wheels in the cache."""
    r = run([SCRIPTS / "build-wheelhouse.sh", *args], env=build_env(), timeout=300)
    if r.returncode == 0:
        for line in r.stdout.splitlines():
            m = re.fullmatch(r"build-wheelhouse\.sh: \d+ wheels for .* in (/.*)", line)
            for wheel in Path(m.group(1)).glob("*.whl") if m else ():
                if not wheel.name.startswith("edge_upgrade_agent-"):
                    tmp = WHEEL_CACHE / f".{wheel.name}.{os.getpid()}"
                    shutil.copyfile(wheel, tmp)
                    tmp.replace(WHEEL_CACHE / wheel.name)  # whole files only, for a parallel run
    return r


def wheel_tags(name: str) -> tuple[str, set[str], set[str], set[str]]:
    """(canonical distribution name, python tags, abi tags, platform tags)."""
    parts = name.removesuffix(".whl").split("-")
    assert len(parts) in (5, 6), name
    pys, abis, plats = (set(t.split(".")) for t in parts[-3:])
    return canonical(parts[0]), pys, abis, plats


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements(agent_wheel: Path) -> set[str]:
    """The agent's Requires-Dist without extras: pyproject's [project] dependencies."""
    with zipfile.ZipFile(agent_wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.HeaderParser().parsestr(z.read(meta).decode())
    names = set()
    for req in msg.get_all("Requires-Dist") or []:
        if "extra ==" not in req:
            m = re.match(r"[A-Za-z0-9._-]+", req)
            assert m, req
            names.add(canonical(m.group(0)))
    return names


def rewrite_manifest(bundle: Path, changes: dict[str, str] | None) -> None:
    """Edit bundle.json (None: remove it, like a bundle from before issue 15),
    and SHA256SUMS with it, so only the manifest's content is wrong."""
    manifest = bundle / "bundle.json"
    sums = [line for line in (bundle / "SHA256SUMS").read_text().splitlines()
            if not line.endswith("  bundle.json")]
    if changes is None:
        manifest.unlink()
    else:
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **changes}))
        sums.append(f"{hashlib.sha256(manifest.read_bytes()).hexdigest()}  bundle.json")
    (bundle / "SHA256SUMS").write_text("".join(f"{line}\n" for line in sums))


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


# -- bundles for another architecture (issue 15) -------------------------------


@pytest.fixture(scope="module")
def arm64_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An arm64 / Python 3.11 bundle, built on this host (amd64 in CI)."""
    out = tmp_path_factory.mktemp("bundles")
    r = build_bundles(["--arch", "arm64", "--python", "3.11", "--out", out])
    assert r.returncode == 0, f"build-wheelhouse.sh (needs PyPI or a mirror):\n{r.stderr}"
    bundle = out / "wheelhouse-arm64-py3.11"
    assert [p.name for p in out.iterdir()] == [bundle.name]
    assert f"for arm64 / Python 3.11 in {bundle}" in r.stdout, r.stdout
    return bundle


def test_arm64_bundle_holds_aarch64_wheels_of_every_dependency(arm64_bundle: Path) -> None:
    wheels = sorted(p.name for p in arm64_bundle.glob("*.whl"))
    tags = {name: wheel_tags(name) for name in wheels}
    for name, (_, pys, abis, plats) in tags.items():
        # Pure wheels (py3-none-any) or aarch64 manylinux ones, for CPython 3.11.
        assert plats == {"any"} or all(
            p.startswith("manylinux") and p.endswith("_aarch64") for p in plats), name
        assert (pys <= {"py3", "py2"} and abis == {"none"}) or "cp311" in pys or (
            abis == {"abi3"} and all(re.fullmatch(r"cp3(\d+)", t) for t in pys)), name
    compiled = {dist for dist, _, _, plats in tags.values() if plats != {"any"}}
    assert compiled >= {"cryptography", "cffi", "pyyaml"}, wheels
    dists = {dist for dist, *_ in tags.values()}
    assert len(dists) == len(wheels), wheels  # one version of each

    agent = arm64_bundle / f"edge_upgrade_agent-{__version__}-py3-none-any.whl"
    assert agent.name in wheels
    requirements = runtime_requirements(agent)
    assert requirements >= {"cryptography", "pyyaml", "aiomqtt"}, requirements
    assert requirements <= dists, requirements - dists

    manifest = json.loads((arm64_bundle / "bundle.json").read_text())
    assert {k: manifest[k] for k in ("arch", "python", "agent_version", "wheels")} == {
        "arch": "arm64", "python": "3.11", "agent_version": __version__, "wheels": wheels}
    datetime.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%SZ")

    # What the runbook tells the operator to run on site.
    r = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=arm64_bundle,
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    listed = {line.split("  ", 1)[1] for line in (arm64_bundle / "SHA256SUMS").read_text()
              .splitlines()}
    assert listed == {*wheels, "bundle.json"}


def install_refused(tmp_path: Path, bundle: Path) -> str:
    """Run install.sh with BUNDLE; assert it failed having created nothing; its stderr."""
    root = tmp_path / "root"
    r = run([SCRIPTS / "install.sh", "--root", root, "--wheelhouse", bundle,
             "--node-name", "edge-9"], env={**offline_env(), "PYTHON": sys.executable},
            timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    # No venv, no unit, no config: not even the --root directory.
    assert not root.exists(), sorted(str(p) for p in root.rglob("*"))
    assert "created" not in r.stdout and "installed" not in r.stdout, r.stdout
    return r.stderr


def test_install_refuses_a_bundle_for_another_arch(tmp_path: Path, arm64_bundle: Path) -> None:
    if (HOST_ARCH, HOST_PY) == ("arm64", "3.11"):
        pytest.skip("this host is arm64 / Python 3.11: the arm64 bundle is its own")
    err = install_refused(tmp_path, arm64_bundle)
    assert (f"install.sh: error: {arm64_bundle}: this bundle is for arm64 / Python 3.11; "
            f"this host is {HOST_ARCH} / Python {HOST_PY}: ") in err, err
    if HOST_ARCH in ("amd64", "arm64"):
        assert (f"build one with scripts/build-wheelhouse.sh --arch {HOST_ARCH} "
                f"--python {HOST_PY}\n") in err, err


@pytest.mark.parametrize(("manifest", "expected"), [
    # Made for this arch, for another Python minor.
    ({"arch": HOST_ARCH, "python": "3.10" if HOST_PY != "3.10" else "3.12"},
     f"this host is {HOST_ARCH} / Python {HOST_PY}"),
    # A manifest that names this host over aarch64 wheels: the wheels' tags decide.
    ({"arch": HOST_ARCH, "python": HOST_PY}, "but these wheels are not for it: cffi-"),
    # No manifest (a bundle from before issue 15): only if every wheel fits this host.
    (None, "an older bundle (no bundle.json) whose wheels are not all for"),
], ids=["other-python", "manifest-contradicts-wheels", "old-bundle-other-arch"])
def test_install_refuses_a_bundle_whose_wheels_do_not_fit(
        tmp_path: Path, arm64_bundle: Path, manifest: dict[str, str] | None,
        expected: str) -> None:
    if HOST_ARCH == "arm64":
        pytest.skip("the arm64 bundle's wheels fit this arm64 host")
    bundle = shutil.copytree(arm64_bundle, tmp_path / "bundle")
    rewrite_manifest(bundle, manifest)
    err = install_refused(tmp_path, bundle)
    assert expected in err, err
    assert f"scripts/build-wheelhouse.sh --arch {HOST_ARCH} --python {HOST_PY}" in err, err


def flip_a_byte(bundle: Path) -> str:
    wheel = next(bundle.glob("cryptography-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01
    wheel.write_bytes(bytes(data))
    return f"SHA256SUMS does not match {wheel.name} (damaged or altered copy)"


def add_a_wheel(bundle: Path) -> str:
    shutil.copy(next(bundle.glob("edge_upgrade_agent-*.whl")),
                bundle / "edge_upgrade_agent-99.0-py3-none-any.whl")
    return "not in SHA256SUMS, so not part of the bundle: edge_upgrade_agent-99.0-py3-none-any.whl"


def lose_a_wheel(bundle: Path) -> str:
    wheel = next(bundle.glob("pyyaml-*.whl"))
    wheel.unlink()
    return f"listed in SHA256SUMS but missing (incomplete copy?): {wheel.name}"


def lose_the_sums(bundle: Path) -> str:
    (bundle / "SHA256SUMS").unlink()
    return "no SHA256SUMS: not a complete bundle from scripts/build-wheelhouse.sh"


@pytest.mark.parametrize("damage", [flip_a_byte, add_a_wheel, lose_a_wheel, lose_the_sums])
def test_install_refuses_a_damaged_bundle_before_its_manifest(tmp_path: Path,
                                                             arm64_bundle: Path,
                                                             damage: Callable[[Path], str],
                                                             ) -> None:
    # Checked first, so these hold on any host, the arm64 bundle's own included.
    bundle = shutil.copytree(arm64_bundle, tmp_path / "bundle")
    expected = damage(bundle)
    err = install_refused(tmp_path, bundle)
    assert f"install.sh: error: {bundle}: {expected}" in err, err
    assert "this bundle is for" not in err


@pytest.mark.parametrize("args", [
    ["--arch", "sparc"],
    ["--arch"],
    ["--python", "3"],
    ["--python", "python3.11"],
    ["--out", "OUT", "BUNDLE"],
    ["--arch", "arm64", "--arch", "amd64", "BUNDLE"],   # BUNDLE_DIR holds one bundle
    ["--no-such-option"],
])
def test_build_wheelhouse_rejects_bad_usage(tmp_path: Path, args: list[str]) -> None:
    args = [str(tmp_path / a) if a in ("OUT", "BUNDLE") else a for a in args]
    r = run([SCRIPTS / "build-wheelhouse.sh", *args], timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert not any(tmp_path.iterdir())


# -- the real thing ---------------------------------------------------------------


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The one-bundle form (BUNDLE_DIR, no options): this host's arch and Python.
    out = tmp_path_factory.mktemp("wheelhouse")
    r = build_bundles([out])
    assert r.returncode == 0, f"build-wheelhouse.sh (needs PyPI or a mirror):\n{r.stderr}"
    assert list(out.glob("edge_upgrade_agent-*.whl")), sorted(p.name for p in out.iterdir())
    assert (out / "SHA256SUMS").is_file()
    manifest = json.loads((out / "bundle.json").read_text())
    assert (manifest["arch"], manifest["python"]) == (HOST_ARCH, HOST_PY)
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
    assert f"{HOST_ARCH} / Python {HOST_PY}, agent {__version__}" in r.stdout
    assert "SHA256SUMS verified" in r.stdout
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
    # From a bundle as build-wheelhouse.sh made them before issue 15 (no
    # bundle.json): taken, with a warning, as its wheels fit this host.
    old_bundle = shutil.copytree(wheelhouse, tmp_path / "old-bundle")
    rewrite_manifest(old_bundle, None)
    conf.write_text(text + "# operator's own line\n")
    before = conf.read_bytes()
    unit.write_text("[Unit]\nDescription=stale\n")
    r = run([SCRIPTS / "install.sh", "--root", root, "--wheelhouse", old_bundle,
             "--node-name", "other-node", "--broker", "other.test:1883", *tls_args],
            env=offline_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" in r.stderr and "has no bundle.json" in r.stderr, r.stderr
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
