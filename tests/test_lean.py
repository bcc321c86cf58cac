"""An idle daemon stays lean (issue 10): what it imports at start.

The daemon must not load ``cryptography``, the docker SDK or ``requests`` at
start unless a trusted key has to be loaded: each one costs megabytes of
resident memory on nodes with 1-2 GiB (docs/performance.md, "Idle memory").
Nor the steps a job runs, nor what ``agent.lean`` defers (``urllib.request``,
bz2, lzma, uuid, tarfile, shutil), which must still load, transparently,
wherever something really uses it (the ``idna`` codec: tests/test_idna_codec.py).
Start-up is reproduced in a fresh interpreter, as ``run`` does it. The TLS
check that spares the daemon ``cryptography`` is tests/test_tls_check.py's.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import lean
from agent.config import load_config
from agent.errors import InvalidCommand
from agent.intake import Parser
from agent.security.signing import sign
from testkit.pki import Pki, make_pki
from testkit.standins import make_node

HEAVY = ("cryptography", "docker", "requests", "urllib3")
# Imported by the handler that runs them (agent/runner.py, agent/cli.py), and
# the rehearsal's plan with every precheck and the doctor (agent/daemon.py).
STEPS = ("agent.operations", "agent.steps.backup", "agent.steps.image", "agent.steps.rollback",
         "agent.steps.unit", "agent.steps.verify", "agent.execute", "agent.plan",
         "agent.steps.precheck", "agent.doctor", "tenacity")
# agent.lean.DEFERRED, and what urllib.request would have pulled in.
DEFERRED = ("urllib.request", "http.client", "email", "bz2", "lzma", "uuid", "tarfile", "shutil",
            "zlib")
# Imported where a job, a pull or a signer needs them (issue 10): the file
# helpers (hashing, atomic writes), urllib.error (which loads tempfile and
# random), secrets and random (the jitter uses os.urandom).
JOB_ONLY = ("agent.adapters.files", "urllib.error", "tempfile", "random", "secrets")
WATCHED = STEPS + DEFERRED + JOB_ONLY

# What `edge-upgrade-agent run` does before it waits for commands (agent/cli.py,
# agent/daemon.py): load the config, check the daemon's files, build the node,
# the parser, the daemon and its transport, and recover. Then one signed command
# arrives, which no key can verify: it is refused without loading cryptography.
START = """
import asyncio, json, sys, time
from pathlib import Path
from agent.cli import load_config, check_daemon_files, setup_logging
from agent.daemon import Daemon, make_transport
from agent.errors import InvalidCommand
from agent.intake import Parser
from agent.node import build_node

config = load_config(Path(sys.argv[1]))
setup_logging(config.log_level, json_output=True)
check_daemon_files(config)

async def start() -> str:
    node = build_node(config)
    try:
        daemon = Daemon(node, Parser(config))
        daemon.transport = make_transport(config, daemon)
        daemon.recover()
        signed = {"signed": {"jobName": "j", "version": "v1.13.0", "commandId": "c" * 22,
                             "issuedAt": int(time.time()), "expiresAt": int(time.time()) + 60},
                  "keyId": "ops-1", "alg": "Ed25519", "signature": "A" * 86 + "=="}
        try:
            daemon.intake.parser.parse(json.dumps(signed).encode(), "test")
        except InvalidCommand as exc:
            return exc.reason
        return "accepted"
    finally:
        node.close()

reason = asyncio.run(start())
from agent.lean import is_loaded
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
loaded = [m for m in WATCHED if is_loaded(m)]
print(json.dumps({"heavy": heavy, "signed": reason, "loaded": loaded}))
""".replace("HEAVY", repr(HEAVY)).replace("WATCHED", repr(WATCHED))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ("node-1",))


def _config(tmp_path: Path, pki: Pki, **extra: Any) -> Path:
    root = tmp_path / "root"
    make_node(root, "v1.12.1")
    cert, key = pki.client("node-1")
    settings: dict[str, Any] = {
        "node_name": "node-1",
        "paths": {"root": str(root)},
        "service": {"manager": "process"},
        "security": {"trusted_keys_dir": str(tmp_path / "trusted")},
        "transport": {"kind": "mqtt", "mqtt": {
            "host": "127.0.0.1", "port": 1, "ca_file": str(pki.ca_cert),
            "cert_file": str(cert), "key_file": str(key)}},
        **extra,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _start(config: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", START, str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("extra", [
    {"transport": {"kind": "spool"}},
    {"images": {"backend": "docker"}},
    {"images": {"backend": "containerd"}},
    {"images": {"backend": "auto"}},
    {"images": {"local": {"dir": "/images"}}},
], ids=["spool", "mqtt-docker", "mqtt-containerd", "mqtt-auto", "mqtt-local"])
def test_start_loads_no_heavy_module(tmp_path: Path, pki: Pki, extra: dict[str, Any]) -> None:
    (tmp_path / "trusted").mkdir()  # as install.sh leaves it: a directory, no keys yet
    result = _start(_config(tmp_path, pki, **extra))
    assert result["heavy"] == []
    assert result["signed"] == "unknown signing key id 'ops-1'"
    # The config loads a configured registry backend's module: it no longer
    # subclasses urllib.request's handler at import, nor imports tarfile. The
    # spool transport writes its reports with the file helpers from the start.
    spool = extra.get("transport", {}).get("kind") == "spool"
    assert result["loaded"] == (["agent.adapters.files"] if spool else [])


def test_a_trusted_key_loads_cryptography_at_start(tmp_path: Path, pki: Pki) -> None:
    """The documented exception: keys are parsed at start, so the floor is higher."""
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "ops-1.pub").write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    result = _start(_config(tmp_path, pki))
    assert [m for m in result["heavy"] if m.startswith(("docker", "requests"))] == []
    assert "cryptography" in result["heavy"]
    assert result["signed"] == "bad signature (key id 'ops-1')"


# What `edge-upgrade-agent run` itself has loaded once it is ready and idle: the
# console script's main(), then a dump of sys.modules when it exits on SIGTERM.
RUN = """
import atexit, json, sys
from agent.lean import is_loaded
atexit.register(lambda: print(json.dumps(sorted(m for m in sys.modules if is_loaded(m)))))
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_idle_daemon_has_not_loaded_the_steps_or_the_deferred(tmp_path: Path,
                                                                  pki: Pki) -> None:
    (tmp_path / "trusted").mkdir()
    config = _config(tmp_path, pki, transport={"kind": "spool"})
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(60)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    proc = subprocess.Popen([sys.executable, "-c", RUN, "--config", str(config), "run"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while "READY=1" not in notify.recv(4096).decode():
            pass
        # release_memory() ran right after READY=1: had it failed, the exit code says so.
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    loaded = set(json.loads(out.decode().splitlines()[-1]))
    assert "agent.daemon" in loaded and "agent.runner" in loaded
    # (The spool transport, which this daemon uses, writes with the file helpers.)
    assert sorted(loaded & set(WATCHED) - {"agent.adapters.files"}) == []


def test_signed_commands_still_verify(tmp_path: Path, pki: Pki) -> None:
    key = Ed25519PrivateKey.generate()
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "ops-1.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    config = load_config(_config(tmp_path, pki, security={
        "require_signed_commands": True, "trusted_keys_dir": str(trusted)}))
    parser = Parser(config)
    good = sign({"jobName": "signed-ok", "version": "v1.13.0"}, key, "ops-1")
    accepted = parser.parse(json.dumps(good).encode(), "test")
    assert accepted.command.key == "signed-ok" and accepted.command_id is not None
    forged = sign({"jobName": "forged", "version": "v1.13.0"}, Ed25519PrivateKey.generate(),
                  "ops-1")
    with pytest.raises(InvalidCommand, match="bad signature"):
        parser.parse(json.dumps(forged).encode(), "test")
    with pytest.raises(InvalidCommand, match="unsigned command"):
        parser.parse(b'{"jobName": "plain", "version": "v1.13.0"}', "test")


# -- deferred modules: transparent to whoever really uses them ---------------------------


def _fresh(code: str, *args: str) -> Any:
    """Run ``code`` in a fresh interpreter (this one has everything loaded); its last line."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO), "no_proxy": ""})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


PAHO_PROXY = """
import json, os, sys, types
from agent import lean
lean.defer_imports()
import paho.mqtt.client as mc
import urllib.request
stub = urllib.request
idle = [m for m in ("urllib.request", "http.client", "email") if lean.is_loaded(m)]
# As if PySocks were installed: paho's Client._get_proxy() reads the environment
# through urllib.request, the one place paho uses it.
mc.socks = types.SimpleNamespace(HTTP=3, SOCKS4=1, SOCKS5=2, get_default_proxy=lambda: None)
os.environ["mqtt_proxy"] = "http://proxy.example:3128"
client = mc.Client(mc.CallbackAPIVersion.VERSION2)
client._host = "broker.example"
proxy = client._get_proxy()
real = sys.modules["urllib.request"]
print(json.dumps({
    "idle": idle, "proxy": proxy, "loaded": lean.is_loaded("urllib.request"),
    "package_attribute": urllib.request is real,
    "stub_delegates": stub.getproxies is real.getproxies,
    "from_import": __import__("urllib.request", fromlist=["Request"]).Request is real.Request,
}))
"""


def test_paho_with_pysocks_loads_the_real_urllib_request() -> None:
    result = _fresh(PAHO_PROXY)
    assert result["idle"] == []  # paho imported, urllib.request not loaded
    assert result["proxy"] == {"proxy_type": 3, "proxy_addr": "proxy.example",
                               "proxy_port": 3128}
    assert result["loaded"] and result["package_attribute"]
    assert result["stub_delegates"] and result["from_import"]


class _MetaServer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/api/v1/nodes/node-1"
        body = json.dumps({"status": {"nodeInfo": {
            "kubeletVersion": "v1.29.5-kubeedge-v1.13.0"}}}).encode() if ok else b"{}"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def metaserver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MetaServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


METASERVER = """
import asyncio, json, sys
from agent.cli import main  # defers, as the console script does
from agent import lean
from agent.adapters.edgecore import EdgecoreProbe
from agent.config import parse_config
config = parse_config({"node_name": "node-1", "health": {"metaserver_url": sys.argv[1]}})
before = lean.is_loaded("urllib.request")
# First use in a worker thread (asyncio.to_thread), as the daemon's version probe does.
version = asyncio.run(EdgecoreProbe(config, None).from_metaserver())
print(json.dumps({"before": before, "version": str(version),
                  "after": lean.is_loaded("urllib.request")}))
"""


def test_the_metaserver_query_loads_the_real_urllib_request(metaserver: str) -> None:
    assert _fresh(METASERVER, metaserver) == {"before": False, "version": "v1.13.0",
                                              "after": True}


OTHER_USERS = """
from agent import lean
lean.defer_imports()
import bz2, io, json, shutil, sys, tarfile, threading, urllib.request, uuid
deferred = [m for m in lean.DEFERRED if not lean.is_loaded(m)]
# Threads racing for the first use get one module, and no error.
barrier, seen = threading.Barrier(8), []
def first_use():
    barrier.wait()
    seen.append(urllib.request.Request)
threads = [threading.Thread(target=first_use) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
# The registry client subclasses urllib.request's classes on first use; the docker SDK
# (through requests) imports names from it.
from agent.adapters import registry
import docker
# tarfile compresses with bz2 and lzma; shutil was told they exist.
archives = {}
for mode in ("w:bz2", "w:xz"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        info = tarfile.TarInfo("f")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:*") as tar:
        archives[mode] = tar.extractfile("f").read().decode()
real = sys.modules["urllib.request"]
print(json.dumps({
    "deferred": deferred, "one_class": len({id(c) for c in seen}) == 1 and len(seen) == 8,
    "registry": issubclass(registry._no_auth_on_redirect(), real.HTTPRedirectHandler),
    "docker": docker.APIClient.__name__, "archives": archives,
    "formats": sorted(f[0] for f in shutil.get_archive_formats()),
    "uuid": len(str(uuid.uuid4())), "bz2": bz2.decompress(bz2.compress(b"x")).decode(),
    "loaded": [m for m in lean.DEFERRED if lean.is_loaded(m)],
}))
"""


def test_every_other_user_gets_the_real_modules() -> None:
    result = _fresh(OTHER_USERS)
    assert result["deferred"] == list(lean.DEFERRED)
    assert result["one_class"] and result["registry"] and result["docker"] == "APIClient"
    assert result["archives"] == {"w:bz2": "hi", "w:xz": "hi"}
    assert {"bztar", "xztar"} <= set(result["formats"])
    assert result["uuid"] == 36 and result["bz2"] == "x"
    assert result["loaded"] == list(lean.DEFERRED)


@pytest.fixture
def probe_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package ``leanprobe`` whose submodule ``sub`` counts its executions."""
    pkg = tmp_path / "leanprobe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("runs = []\n")
    (pkg / "sub.py").write_text("import leanprobe\nleanprobe.runs.append(1)\nVALUE = 42\n"
                                "def get():\n    return VALUE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "leanprobe.sub"
    for name in ("leanprobe.sub", "leanprobe"):
        sys.modules.pop(name, None)


def test_a_deferred_module_runs_on_first_use_only(probe_package: str) -> None:
    import leanprobe  # type: ignore[import-not-found]

    lean.defer_import(probe_package)
    import leanprobe.sub  # type: ignore[import-not-found]
    from leanprobe import sub

    assert leanprobe.runs == [] and not lean.is_loaded(probe_package)
    assert sub is leanprobe.sub and sub.__name__ == probe_package
    assert sub.VALUE == 42 and leanprobe.runs == [1]  # the first attribute read
    real = sys.modules[probe_package]
    assert lean.is_loaded(probe_package) and leanprobe.sub is real and real is not sub
    sub.VALUE = 7  # a write through the stand-in reaches the module the code uses
    assert real.get() == 7 and sub.get() == 7 and leanprobe.runs == [1]
    lean.defer_import(probe_package)  # loaded already: nothing to do
    assert sys.modules[probe_package] is real


def test_deferring_a_missing_module_changes_nothing() -> None:
    lean.defer_import("leanprobe_missing")
    assert "leanprobe_missing" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        __import__("leanprobe_missing")


def test_release_memory_trims_now_and_once_more_later(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    fourth = threading.Event()

    def trim(pad: int) -> int:
        calls.append(pad)
        if len(calls) == 4:
            fourth.set()
        return 1

    monkeypatch.setattr(lean, "_trim", trim)
    monkeypatch.setattr(lean, "_later", None)
    monkeypatch.setattr(lean, "SETTLE_SECONDS", 0.01)
    lean.release_memory()  # no event loop: one pass, nothing scheduled
    assert calls == [0] and lean._later is None

    async def twice() -> None:
        lean.release_memory()
        first = lean._later
        lean.release_memory()  # the first one's later pass is replaced, not added
        assert calls == [0, 0, 0] and first is not None and first.cancelled()
        await asyncio.to_thread(fourth.wait, 30)

    asyncio.run(twice())
    assert calls == [0, 0, 0, 0]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_memory_finds_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean, "_trim", None)
    lean.release_memory()
    assert lean._trim is not None and lean._trim is not lean._no_trim
