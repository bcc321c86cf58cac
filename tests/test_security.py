"""Every trust boundary, each shown holding against the real part that enforces it.

docs/security.md maps each boundary to what protects it and to its test here,
or, for a test that lives with its subsystem, to that file. Run it with
``-p testkit.secretguard`` to have the credential guard watch it as well.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import os
import re
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Sandbox, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from test_mqtt import Agent, online

from agent.errors import InvalidCommand
from agent.intake import Intake, Parser
from agent.runner import Runner
from agent.security.signing import canonical_json, is_signed, sign, verify
from agent.states import State
from agent.transport.base import Inbound
from testkit import secretguard
from testkit.broker import Broker
from testkit.cloud import Cloud
from testkit.fakes import fake_node
from testkit.pki import KeyKind, Pki, UnsupportedKey, issue_client, make_other_ca

pytest_plugins = ["pytester"]

NOW = 1_700_000_000
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
KEYS = {"ops-1": KEY.public_key()}
COMMAND: dict[str, Any] = {"operation": "upgrade", "jobName": "job-1", "version": "v1.13.0"}
NOT_ALLOWED = "evil.example.com:5000/kubeedge/installation-package"


def use_mqtt(box: Sandbox, broker: Broker, cert: Path, key: Path, ca: Path, **extra: Any) -> None:
    box.configure(transport={"kind": "mqtt", "mqtt": {
        "host": "127.0.0.1", "port": broker.port, "ca_file": str(ca), "cert_file": str(cert),
        "key_file": str(key), "reconnect_min_seconds": 0.2, "reconnect_max_seconds": 1,
        **extra}})


@contextlib.contextmanager
def daemon(box: Sandbox, umask: int | None = None) -> Iterator[Agent]:
    a = Agent(box)
    old = os.umask(umask) if umask is not None else None  # the child keeps it
    try:
        a.start()
    finally:
        if old is not None:
            os.umask(old)
    try:
        yield a
    finally:
        a.stop(signal.SIGKILL)


# ---------------------------------------------------------------- MQTT: mutual TLS and the ACL
# The broker alone, with plain clients: tests/test_broker_fixture.py refuses a client
# without a certificate or from another CA and confines each node to its topics.


@pytest.mark.parametrize(("kind", "message"), [
    ("rsa1024", "RSA key of 1024 bits is too weak"),
    ("p192", "EC curve secp192r1 is too weak"),
    (None, "transport.mqtt: cannot read"),  # no client certificate at all
])
def test_weak_client_key_is_refused_at_config_validation(sandbox: Sandbox, pki: Pki,
                                                         tmp_path: Path,
                                                         kind: KeyKind | None,
                                                         message: str) -> None:
    cert, key = tmp_path / "none.crt", tmp_path / "none.key"
    if kind is not None:
        try:
            cert, key = issue_client(pki, "node-1", key=kind, directory=tmp_path / "weak")
        except UnsupportedKey as exc:
            pytest.skip(str(exc))
    sandbox.configure(transport={"kind": "mqtt", "mqtt": {
        "ca_file": str(pki.ca_cert), "cert_file": str(cert), "key_file": str(key)}})
    for args in (("config", "validate"), ("run",)):  # the daemon never tries to connect
        proc = sandbox.cli(*args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_broker_refuses_an_agent_certificate_from_another_ca(
        sandbox: Sandbox, broker: Broker, pki: Pki, cloud: Cloud, tmp_path: Path) -> None:
    other = make_other_ca(tmp_path / "other-ca")
    use_mqtt(sandbox, broker, *other.client("node-1"), pki.ca_cert)
    mark = broker.log_mark()
    with daemon(sandbox) as a:
        broker.wait_for_log("certificate verify failed", since=mark, timeout=30)
        # The TLS alert reaches the agent at once; its own timeout comes 10 s later.
        wait_for(lambda: "alert unknown ca" in a.log_text().lower()
                 or "broker connection lost" in a.log_text())
        assert '"connected to broker"' not in a.log_text()
        assert cloud.presence() == []


def test_agent_refuses_a_broker_certificate_from_another_ca(sandbox: Sandbox, pki: Pki,
                                                           tmp_path: Path) -> None:
    """The broker trusts the node; only the agent's own check of the broker can refuse."""
    other = make_other_ca(tmp_path / "other-ca")
    impostor = Broker(Pki(other.dir, pki.ca_cert, pki.ca_key, other.server_cert,
                          other.server_key), tmp_path / "impostor")
    use_mqtt(sandbox, impostor, *pki.client("node-1"), pki.ca_cert)
    with impostor, daemon(sandbox) as a:
        wait_for(lambda: "certificate verify failed" in a.log_text())
        assert "New client connected" not in impostor.log_tail(500)


def test_rotated_weak_key_is_refused_and_the_connection_kept(
        sandbox: Sandbox, broker: Broker, pki: Pki, cloud: Cloud, tmp_path: Path) -> None:
    cert, key = pki.client("node-1")
    use_mqtt(sandbox, broker, cert, key, pki.ca_cert, cert_check_interval_seconds=0.3)
    with daemon(sandbox) as a:
        wait_for(lambda: online(cloud))
        weak = issue_client(pki, "node-1", key="rsa1024", directory=tmp_path / "weak")
        for src, dst in zip(weak, (cert, key), strict=True):  # by rename, like cert tools
            dst.with_suffix(".tmp").write_bytes(src.read_bytes())
            dst.with_suffix(".tmp").replace(dst)
        wait_for(lambda: "RSA key of 1024 bits is too weak" in a.log_text())
        assert "new TLS files refused; keeping the current connection" in a.log_text()
        cloud.send({"jobName": "after-weak-rotation", "version": "v1.13.0"})
        wait_for(lambda: cloud.finals("after-weak-rotation"), timeout=60)
        assert a.log_text().count('"connected to broker"') == 1


def test_refused_publish_is_loud_and_the_report_is_kept(sandbox: Sandbox, broker: Broker,
                                                        pki: Pki) -> None:
    """node-1's certificate cannot publish node-2's status: PUBACK 135, nothing lost."""
    sandbox.configure(node_name="node-2")
    use_mqtt(sandbox, broker, *pki.client("node-1"), pki.ca_cert)
    sandbox.cli("upgrade", "--to-version", "v1.12.1", "--yes")  # a skip: one final report
    queued = len(sandbox.reports())
    with daemon(sandbox) as a:
        wait_for(lambda: "broker refused a publish" in a.log_text())
        assert "reason_code" in a.log_text() and "135" in a.log_text()
        assert len(sandbox.reports()) == queued


# ---------------------------------------------------------------- signed commands
# Wire format, malformed envelopes, key files and the fuzz test: tests/test_signing.py.


def signed_command(**kwargs: Any) -> dict[str, Any]:
    return sign(COMMAND, KEY, "ops-1", now=NOW, **kwargs)


def rejected(data: Any, reason: str, **kwargs: Any) -> None:
    with pytest.raises(InvalidCommand) as info:
        verify(data, KEYS, **kwargs)
    assert info.value.reason == reason


@pytest.mark.parametrize(("field", "value"), [
    ("jobName", "job-2"), ("version", "v1.14.0"), ("commandId", "x" * 22),
    ("expiresAt", NOW + 7200), ("issuedAt", NOW - 1), ("extra", True),
])
def test_tampering_breaks_the_signature(field: str, value: Any) -> None:
    data = signed_command()
    data["signed"][field] = value
    rejected(data, "bad signature (key id 'ops-1')", now=NOW)


def test_removing_a_field_breaks_the_signature() -> None:
    data = signed_command()
    del data["signed"]["version"]
    rejected(data, "bad signature (key id 'ops-1')", now=NOW)


def test_wrong_key_under_the_same_id() -> None:
    data = signed_command()
    data["signature"] = base64.b64encode(OTHER.sign(canonical_json(data["signed"]))).decode()
    rejected(data, "bad signature (key id 'ops-1')", now=NOW)
    rejected(sign(COMMAND, OTHER, "ops-1", now=NOW), "bad signature (key id 'ops-1')", now=NOW)


def test_unknown_key_id() -> None:
    rejected(sign(COMMAND, KEY, "ops-2", now=NOW), "unknown signing key id 'ops-2'", now=NOW)


def test_expiry_and_issue_time() -> None:
    data = signed_command(ttl_seconds=60)
    verify(data, KEYS, now=NOW + 59)
    rejected(data, "command expired at 2023-11-14T22:14:20Z", now=NOW + 60)
    verify(data, KEYS, now=NOW - 300)  # within the clock skew allowance
    rejected(data, "command issued in the future (2023-11-14T22:13:20Z)", now=NOW - 301)
    verify(data, KEYS, now=NOW - 10, max_skew_seconds=10)
    rejected(data, "command issued in the future (2023-11-14T22:13:20Z)", now=NOW - 11,
             max_skew_seconds=10)


@pytest.mark.parametrize("data", [COMMAND, {}, {"signed": {}}, {"signature": "x"}, [], "x"])
def test_unsigned(data: Any) -> None:
    assert not is_signed(data)
    rejected(data, "unsigned command (signatures are required)")


def trust(directory: Path, key: Ed25519PrivateKey = KEY) -> Path:
    directory.mkdir()
    (directory / "ops-1.pub").write_bytes(key.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return directory


def test_a_replay_is_refused_once_its_job_ran_and_a_redelivery_is_not(tmp_path: Path) -> None:
    node = fake_node(tmp_path / "node", security={"require_signed_commands": True,
                                                  "trusted_keys_dir": str(trust(tmp_path / "k"))})
    queued: list[str] = []
    runner = Runner(node)
    intake = Intake(node, runner, Parser(node.config), queued.append, lambda: None)
    raw = json.dumps(sign({"jobName": "up-1", "version": "v1.13.0"}, KEY, "ops-1")).encode()

    async def ack() -> None:
        pass

    try:
        intake.accept(Inbound("test", raw, ack))
        intake.accept(Inbound("test", raw, ack))  # the broker again, before our ack: no attack
        assert queued == ["up-1"] and intake.rejected_total == 0
        job = node.journal.get("up-1")
        assert job is not None
        runner.advance(job, State.SUCCEEDED, "done")
        intake.accept(Inbound("test", raw, ack))
        assert queued == ["up-1"] and intake.rejected_total == 1
        (replay,) = [j for j in node.journal.jobs(limit=100) if j.state == State.REJECTED]
        assert replay.reason.startswith("replayed command")
    finally:
        node.close()


def test_signed_commands_forged_expired_replayed(sandbox: Sandbox, broker: Broker, pki: Pki,
                                                 cloud: Cloud, tmp_path: Path) -> None:
    """Over the real broker and daemon; a signature does not lift the registry allow-list."""
    sandbox.configure(security={"require_signed_commands": True,
                                "trusted_keys_dir": str(trust(tmp_path / "trusted"))})
    use_mqtt(sandbox, broker, *pki.client("node-1"), pki.ca_cert)
    with daemon(sandbox):
        wait_for(lambda: online(cloud))
        tampered = sign({"jobName": "tampered", "version": "v1.13.0"}, KEY, "ops-1")
        tampered["signed"]["version"] = "v1.14.0"
        for bad in ({"jobName": "unsigned", "version": "v1.13.0"}, tampered,
                    sign({"jobName": "forged", "version": "v1.13.0"}, OTHER, "ops-1"),
                    sign({"jobName": "unknown-key", "version": "v1.13.0"}, KEY, "ops-9"),
                    sign({"jobName": "expired", "version": "v1.13.0"}, KEY, "ops-1",
                         now=NOW, ttl_seconds=60),
                    sign({"jobName": "registry", "version": "v1.13.0", "image": NOT_ALLOWED},
                         KEY, "ops-1")):
            cloud.send(bad)
        expect = {"unsigned": "unsigned command", "tampered": "bad signature",
                  "forged": "bad signature", "unknown-key": "unknown signing key id",
                  "expired": "command expired",
                  "registry": "image registry or repository not allowed"}
        for job, needle in expect.items():
            wait_for(lambda job=job: cloud.rejections(job))
            assert needle in cloud.rejections(job)[0]["reason"], cloud.rejections(job)
        with sqlite3.connect(sandbox.state_dir / "journal.db") as db:
            keys = [k for (k,) in db.execute("SELECT key FROM jobs")]
        assert len(keys) == len(expect) and all(k.startswith("rejected:") for k in keys)
        assert sandbox.running_version() == "v1.12.1"  # none of them ran
        good = sign({"jobName": "signed-ok", "version": "v1.13.0"}, KEY, "ops-1")
        cloud.send(good)
        wait_for(lambda: cloud.finals("signed-ok"), timeout=60)
        assert cloud.finals("signed-ok")[0]["result"] == "upgrade_success"
        cloud.send(good)  # the same signed bytes again, after the job ran
        wait_for(lambda: cloud.rejections("signed-ok"))
        assert "replayed command" in cloud.rejections("signed-ok")[0]["reason"]
        assert len(cloud.finals("signed-ok")) == 1


# ---------------------------------------------------------------- registry allow-list
# Before any network call: tests/test_docker_images.py; the rule: tests/test_versions.py.


def test_cli_refuses_an_image_outside_the_allow_list(sandbox: Sandbox) -> None:
    rc, out = sandbox.upgrade("v1.13.0", "--image", NOT_ALLOWED)
    assert rc != 0 and "image registry or repository not allowed" in json.dumps(out), out
    assert sandbox.running_version() == "v1.12.1"
    assert not (sandbox.state_dir / "backups").exists()


@pytest.mark.parametrize(("realm", "refused"), [
    ("http://auth.example.com/token", True),  # off this host in clear text
    ("ftp://auth.example.com/token", True),
    ("javascript:alert(1)", True),
    ("https://auth.example.com/token", False),
    ("http://127.0.0.1:5000/token", False),  # loopback, like an http registry
    ("http://[::1]:5000/token", False),
])
def test_registry_credentials_never_go_to_a_clear_text_token_realm(
        realm: str, refused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The containerd backend's client: the registry's 401 names the realm that
    gets the basic credentials; an https registry cannot send them to http."""
    import urllib.error

    from agent.adapters.registry import RegistryClient
    from agent.errors import FatalError, TransientError
    from agent.versions import parse_image

    client = RegistryClient(parse_image("registry.example.com/kubeedge/installation-package"),
                            {"username": "edge", "password": "realm-test-secret"})
    sent: list[Any] = []

    def no_network(req: Any, timeout: float) -> Any:
        sent.append(req)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(client._opener, "open", no_network)
    challenge = f'Bearer realm="{realm}",service="registry",scope="repository:x:pull"'
    if refused:
        with pytest.raises(FatalError, match="not an https URL"):
            client._authenticate(challenge)
        assert sent == []
    else:
        with pytest.raises(TransientError, match="token service unreachable"):
            client._authenticate(challenge)
        assert [r.full_url.split("?")[0] for r in sent] == [realm]


# ---------------------------------------------------------------- files at rest
# The unit (systemd/edge-upgrade-agent.service) gives the agent StateDirectoryMode=0700
# and UMask=0027; the agent itself sets no umask.
UNIT_UMASK = 0o027


def modes(top: Path) -> dict[str, int]:
    out = {".": top.stat().st_mode & 0o7777}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(top))] = path.lstat().st_mode & 0o7777
    return out


def listing(seen: dict[str, int], select: Callable[[str, int], object]) -> str:
    return "\n".join(f"{oct(m)} {n}" for n, m in sorted(seen.items()) if select(n, m))


def copies_of_node_files(state_dir: Path) -> set[str]:
    """Backup payloads and the staged package: copies that keep their origin's mode."""
    out = {str(p.relative_to(state_dir)) for p in (state_dir / "staging").rglob("*")
           if p.is_file()}
    for manifest in (state_dir / "backups").glob("*/manifest.json"):
        names = json.loads(manifest.read_text())["files"]
        out |= {str((manifest.parent / n).relative_to(state_dir)) for n in names}
    return out


def test_state_and_backups_are_private_under_the_unit(sandbox: Sandbox) -> None:
    unit = (REPO / "systemd/edge-upgrade-agent.service").read_text()
    assert "\nStateDirectoryMode=0700\n" in unit and "\nUMask=0027\n" in unit
    sandbox.state_dir.mkdir(mode=0o700, parents=True)
    spool, reports = sandbox.state_dir / "spool", sandbox.state_dir / "reports"
    with daemon(sandbox, UNIT_UMASK):  # a whole job: spool, journal, logs, backup, reports
        wait_for(spool.is_dir)
        (spool / ".up.tmp").write_text(json.dumps({"jobName": "up", "version": "v1.13.0"}))
        (spool / ".up.tmp").rename(spool / "up.json")
        wait_for(lambda: any(json.loads(p.read_text())["final"]
                             for p in reports.glob("up-*.json")), timeout=60)
    assert sandbox.running_version() == "v1.13.0"
    seen = modes(sandbox.state_dir)
    assert seen.pop(".") == 0o700  # the barrier: nothing below is reachable by others
    copies = copies_of_node_files(sandbox.state_dir)
    assert any(name.startswith("backups/") for name in copies)
    writable = listing(seen, lambda n, m: m & 0o002)
    assert not writable, writable  # not even below the barrier
    public = listing(seen, lambda n, m: m & 0o007 and n not in copies)
    assert not public, public
    logs = listing(seen, lambda n, m: n.endswith(".jsonl") and m != 0o600)
    assert not logs, logs


def test_state_and_backups_are_private_whatever_the_umask(sandbox: Sandbox) -> None:
    """By hand, outside the unit: the agent adds the unit's UMask=0027 itself."""
    old = os.umask(0o022)  # an operator's `sudo edge-upgrade-agent upgrade`
    try:
        rc, out = sandbox.upgrade("v1.13.0")
    finally:
        os.umask(old)
    assert rc == 0, out
    seen = modes(sandbox.state_dir)
    assert seen.pop(".") & 0o007 == 0  # the barrier: nothing below is reachable by others
    assert seen["backups"] & 0o007 == 0
    copies = copies_of_node_files(sandbox.state_dir)
    public = listing(seen, lambda n, m: m & 0o007 and n not in copies)
    assert not public, public


# ---------------------------------------------------------------- no shell anywhere
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("asyncio", "create_subprocess_shell"),
               ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"), ("pty", "spawn")}
SHELLS = {"sh", "bash", "dash", "/bin/sh", "/bin/bash", "/usr/bin/sh", "/usr/bin/bash"}


def shell_uses(source: str, name: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and (func.value.id, func.attr) in SHELL_CALLS:
                out.append(f"{where}: {func.value.id}.{func.attr}")
            out += [f"{where}: shell=" for kw in node.keywords if kw.arg == "shell"]
            first_arg = node.args[0] if node.args else None
            if isinstance(first_arg, ast.Constant) and first_arg.value in SHELLS:
                out.append(f"{where}: runs {first_arg.value}")
        elif isinstance(node, ast.ImportFrom):
            out += [f"{where}: from {node.module} import {a.name}" for a in node.names
                    if (node.module, a.name) in SHELL_CALLS]
        elif isinstance(node, (ast.List, ast.Tuple)) and node.elts:
            first = node.elts[0]
            if isinstance(first, ast.Constant) and first.value in SHELLS:
                out.append(f"{where}: argv runs {first.value}")
    return out


def test_no_shell_anywhere_in_the_agent() -> None:
    files = sorted((REPO / "agent").rglob("*.py"))
    assert len(files) > 40
    assert [use for path in files
            for use in shell_uses(path.read_text(), str(path.relative_to(REPO)))] == []


def test_the_shell_scan_sees_each_form() -> None:
    source = ("from os import system\nos.system('x')\nos.popen('x')\n"
              "subprocess.run('x', shell=True)\nasyncio.create_subprocess_shell('x')\n"
              "subprocess.run(['sh', '-c', 'x'])\nos.execl('/bin/sh', 'sh', '-c', 'x')\n"
              "subprocess.run(['ls'])\n")
    assert len(shell_uses(source, "bad.py")) == 7


# ---------------------------------------------------------------- credentials in output and files
# Redaction of log events: tests/test_logs.py; no password in any argv: the containerd
# test in tests/test_containerd_images.py.


def test_the_guard_knows_every_password_the_test_rigs_use() -> None:
    # A literal assigned to a PASSWORD name, alone or after the user in a pair; a
    # computed one (bench/docker_pull.py adds random hex) is no fixed value to guard.
    assignment = re.compile(r'PASSWORD\s*=\s*(?:"[^"]*",\s*)?"([^"]+)"(?!\s*\+)')
    found = {m.group(1) for pattern in ("tests/*.py", "testkit/**/*.py", "bench/*.py",
                                        "scripts/*.py")
             for path in REPO.glob(pattern) for m in assignment.finditer(path.read_text())}
    assert found >= {"s3cret", "e2e-secret"}
    assert found <= {s.value for s in secretguard.CANONICAL}, found


SELF_TEST_SECRET = "guard-selftest-0c7f"
LEAKY_TESTS = f"""
from pathlib import Path
from testkit import secretguard

secretguard.register_secret("{SELF_TEST_SECRET}", "self-test secret")


def test_clean(tmp_path: Path) -> None:
    holder = tmp_path / "etc/credentials/registry.txt"  # holds it by design: not a leak
    holder.parent.mkdir(parents=True)
    holder.write_text("{SELF_TEST_SECRET}")


def test_leaks_to_stdout() -> None:
    print("pulling with", secretguard.CANONICAL[2].value)


def test_leaks_to_a_log(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs/job-1.jsonl").write_text('{{"error": "{SELF_TEST_SECRET}"}}')
"""


@pytest.mark.parametrize(("test", "finding"), [
    ("clean", None),
    ("leaks_to_stdout", "test_leaky.py::test_leaks_to_stdout [Captured stdout call]: "
                        "testkit.e2e_host.REGISTRY_PASSWORD"),
    ("leaks_to_a_log", "logs/job-1.jsonl: self-test secret"),
], ids=["clean", "stdout", "log-file"])
def test_the_guard_fails_a_run_that_leaks_and_only_that(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, test: str,
        finding: str | None) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makepyfile(test_leaky=LEAKY_TESTS)
    result = pytester.runpytest_subprocess("-p", "testkit.secretguard", "-p", "no:cacheprovider",
                                           "-k", test, timeout=120)
    out = result.stdout.str()
    assert "1 passed" in out, out
    assert secretguard.CANONICAL[2].value not in out and SELF_TEST_SECRET not in out
    if finding is None:
        assert result.ret == pytest.ExitCode.OK and "secretguard" not in out, out
    else:
        assert result.ret == pytest.ExitCode.TESTS_FAILED, out
        assert "secretguard: a test credential leaked" in out and finding in out, out
