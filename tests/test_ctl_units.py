"""Pure unit tests of edge-upgrade-ctl's logic (agent/ctl): no broker, no processes,
no network, SQLite in tmp_path at most."""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.ctl.manifest import JobSpec, load_manifest, parse_manifest
from agent.ctl.model import JobPhase, JobView, NodePhase, NodeView
from agent.ctl.rollout import COMMAND_SCHEMA, command_for, job_phase, select_nodes
from agent.ctl.settings import CtlSettings, load_settings, parse_settings
from agent.ctl.store import Store
from agent.ctl.view import Live, status_document, table
from agent.errors import MAX_REASON, ConfigError, ManifestError

EXAMPLES = Path("/work/shared/examples")
API1, API2 = "operations.kubeedge.io/v1alpha1", "operations.kubeedge.io/v1alpha2"
D1, D2 = "sha256:" + "a" * 64, "sha256:" + "b" * 64
HID = "3f1c2a9e-7b4d-4e8f-9a01-5c6d7e8f9a0b"
DROP: Any = object()  # leave the key out of the spec
PENDING, RUNNING, OK_ = NodePhase.PENDING, NodePhase.IN_PROGRESS, NodePhase.SUCCESSFUL
FAIL, UNK, SKIP = NodePhase.FAILURE, NodePhase.UNKNOWN, NodePhase.SKIPPED


def doc(api: str = API2, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"version": "v1.13.0", "nodeNames": ["edge-1"]}
    for key, value in spec.items():
        body.pop(key, None)
        if value is not DROP:
            body[key] = value
    return {"apiVersion": api, "kind": "NodeUpgradeJob", "metadata": {"name": "job-a"},
            "spec": body}


def top(**fields: Any) -> dict[str, Any]:
    return {**doc(), **fields}


def selector(**sel: Any) -> dict[str, Any]:
    return doc(nodeNames=DROP, labelSelector=sel)


def expr(op: str, *values: Any, key: str = "k") -> dict[str, Any]:
    return selector(matchExpressions=[{"key": key, "operator": op, "values": list(values)}])


def parse(data: dict[str, Any] | bytes) -> JobSpec:
    return parse_manifest(data if isinstance(data, bytes) else yaml.safe_dump(data).encode())


def refused(data: dict[str, Any] | bytes, needles: str = "") -> str:
    """Refused with a ManifestError whose reason holds each of the '|'-separated needles."""
    with pytest.raises(ManifestError) as err:
        parse(data)
    for needle in filter(None, needles.split("|")):
        assert needle in err.value.reason
    return err.value.reason


# -- manifest ------------------------------------------------------------------------

def test_sample_v1alpha1_keeps_node_names_and_warns() -> None:
    spec = load_manifest(EXAMPLES / "nodeupgradejob.yaml")
    assert (spec.name, spec.api_version, spec.version) == ("upgrade-example", API1, "v1.12.1")
    assert spec.node_names == ("edge-node1", "edge-node2") and spec.selector is not None
    assert spec.image == "kubeedge/installation-package"
    assert len(spec.warnings) == 1 and "nodeNames win" in spec.warnings[0]
    assert (spec.timeout_seconds, spec.concurrency, spec.failure_tolerate) == (300, 1, 0.1)


def test_sample_v1alpha2_selector() -> None:
    spec = load_manifest(EXAMPLES / "nodeupgradejob-v1alpha2.yaml")
    assert spec.image == "registry.example.internal:5000/kubeedge/installation-package"
    assert (spec.timeout_seconds, spec.concurrency, spec.failure_tolerate) == (600, 10, 0.1)
    assert spec.check_items == ("cpu", "mem", "disk") and spec.node_names == ()
    assert spec.selector is not None and spec.warnings == ()
    (req,) = spec.selector.expressions
    assert (req.key, req.operator, req.values) == ("site", "In", ("factory-a", "factory-b"))
    edge = {"node-role.kubernetes.io/edge": ""}
    assert spec.selector.matches({**edge, "site": "factory-b"})
    assert not spec.selector.matches({**edge, "site": "factory-c"})
    assert not spec.selector.matches({"site": "factory-a"})


def test_defaults_and_normalising() -> None:
    spec = parse(doc())
    assert (spec.timeout_seconds, spec.concurrency, spec.failure_tolerate) == (300, 1, 0.1)
    assert (spec.image, spec.check_items, spec.require_confirmation) == (None, (), False)
    assert spec.digests.for_arch("arm64") is None and spec.warnings == ()
    spec = parse(doc(timeoutSeconds=0, concurrency=0, nodeNames=["b", "a", "b"],
                     checkItems=["disk", "cpu", "disk"], failureTolerate=""))
    assert (spec.timeout_seconds, spec.concurrency, spec.failure_tolerate) == (300, 1, 0.1)
    assert spec.node_names == ("b", "a") and spec.check_items == ("disk", "cpu")
    for tool in ("keadm", "KEADM", ""):
        assert parse(doc(API1, upgradeTool=tool)).version == "v1.13.0"
    for raw, value in (("0.25", 0.25), (0.2, 0.2), (1, 1.0), ("0", 0.0)):
        assert parse(doc(failureTolerate=raw)).failure_tolerate == value


@pytest.mark.parametrize(("data", "needles"), [
    (top(apiVersion="operations.kubeedge.io/v1"), "apiVersion"), (top(kind="Job"), "kind 'Job'"),
    (top(metadata={}), "metadata.name"), (top(metadata={"name": "Job_A"}), "metadata.name"),
    (top(metadata={"name": 5}), "metadata.name"), (doc(version=DROP), "spec.version is required"),
    (doc(version="1.13.0"), "version|'1.13.0'"), (doc(version="v1.13"), "version|'v1.13'"),
    (doc(version="v1.13.0; rm -rf /"), "version"), (doc(image="a/b:v1.13.0"), "spec.image|tag"),
    (doc(image=f"a/b@{D1}"), "spec.image|digest"), (doc(image="pkg"), "spec.image|'/'"),
    (doc(bogus=1), "spec: unknown field 'bogus'"), (doc(upgradeTool="keadm"), "'upgradeTool'"),
    (doc(API1, upgradeTool="helm"), "spec.upgradeTool"),
    (doc(nodeNames=DROP), "nodeNames or labelSelector"),
    (doc(nodeNames=[]), "nodeNames or labelSelector"),
    (doc(nodeNames=["Edge_1"]), "node name|'Edge_1'"), (doc(nodeNames="n1"), "spec.nodeNames"),
    (selector(matchLabels={"site": 1}), "matchLabels|'site'"),
    (selector(matchLabels={"site": None}), "matchLabels"),
    (selector(matchFields={}), "labelSelector|unknown field"),
    (expr("In"), "matchExpressions[0]|In needs values"), (expr("NotIn"), "NotIn needs values"),
    (expr("Exists", "x"), "Exists takes no values"),
    (expr("DoesNotExist", "x"), "DoesNotExist takes no values"),
    (expr("Equals", "x"), "matchExpressions[0].operator"),
    (expr("Exists", key=""), "matchExpressions[0].key"), (expr("In", 1), "list of strings"),
    (doc(failureTolerate="abc"), "spec.failureTolerate|'abc'"),
    (doc(failureTolerate="1.5"), "spec.failureTolerate|between 0 and 1"),
    (doc(failureTolerate=-0.1), "spec.failureTolerate|between 0 and 1"),
    (doc(failureTolerate="nan"), "spec.failureTolerate"),
    (doc(failureTolerate=float("nan")), "spec.failureTolerate"),
    (doc(failureTolerate="\u0661"), "spec.failureTolerate"),  # an Arabic-Indic 1
    (doc(failureTolerate="0.0_5"), "spec.failureTolerate"),
    (doc(failureTolerate=True), "spec.failureTolerate must be a string"),
    (doc(concurrency=-1), "spec.concurrency"), (doc(concurrency="2"), "spec.concurrency"),
    (doc(timeoutSeconds=-1), "spec.timeoutSeconds"),
    (doc(timeoutSeconds=86401), "spec.timeoutSeconds|86400"),
    (doc(checkItems=["gpu"]), "spec.checkItems|'gpu'"),
    (doc(imageDigestGatter={"value": D1, "amd64": D2}), "imageDigestGatter|both"),
    (doc(imageDigestGatter={"registryAPI": {"host": "r.io"}}), "registryAPI"),
    (doc(imageDigestGatter={"value": "sha256:xyz"}), "digest|sha256:xyz"),
    (doc(imageDigestGatter={"arm64": "md5:" + "a" * 32}), "digest"),
    (doc(imageDigestGatter={"riscv64": D1}), "imageDigestGatter|'riscv64'"),
])
def test_refusals_name_the_field(data: dict[str, Any], needles: str) -> None:
    refused(data, needles)


@pytest.mark.parametrize(("op", "values", "labels", "match"), [
    ("In", ["a", "b"], {"k": "b"}, True), ("In", ["a"], {"k": "c"}, False),
    ("In", ["a"], {}, False), ("NotIn", ["a"], {"k": "a"}, False),
    ("NotIn", ["a"], {"k": "b"}, True), ("NotIn", ["a"], {}, True),
    ("Exists", [], {"k": ""}, True), ("Exists", [], {}, False),
    ("DoesNotExist", [], {}, True), ("DoesNotExist", [], {"k": "x"}, False),
])
def test_selector_operators(op: str, values: list[str], labels: dict[str, str],
                            match: bool) -> None:
    spec = parse(expr(op, *values))
    assert spec.selector is not None and spec.selector.matches(labels) is match


def test_digests_by_arch() -> None:
    one = parse(doc(imageDigestGatter={"value": D1})).digests
    assert one.for_arch("arm64") == one.for_arch(None) == D1
    both = parse(doc(imageDigestGatter={"amd64": D1, "arm64": D2})).digests
    assert (both.for_arch("amd64"), both.for_arch("arm64")) == (D1, D2)
    amd = parse(doc(imageDigestGatter={"amd64": D1})).digests
    with pytest.raises(ManifestError, match=r"architecture arm64 \(has amd64\)"):
        amd.for_arch("arm64")
    with pytest.raises(ManifestError, match="architecture unknown"):
        amd.for_arch(None)


def test_documents_size_and_syntax(tmp_path: Path) -> None:
    one = yaml.safe_dump(doc()).encode()
    refused(b"---\n" + one + b"---\n" + one, "expected one NodeUpgradeJob, found 2")
    refused(b"", "found 0 documents")
    refused(b"spec: [\n", "not YAML")
    refused(b"- 1\n", "the document must be a mapping")
    refused(b"a: !!python/object:os.system {}\n", "not YAML")
    refused(one + b"  version: v1.14.0\n", "not YAML|version")  # a key given twice
    refused(one + b"#" * (1 << 20), "larger than 1048576 bytes")
    (tmp_path / "big.yaml").write_bytes(one + b"#" * (1 << 21))
    with pytest.raises(ManifestError, match="larger than"):
        load_manifest(tmp_path / "big.yaml")
    (tmp_path / "bad.yaml").write_bytes(one + b"# \xff\n")
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(tmp_path / "bad.yaml")


def bomb(levels: int, tail: str) -> bytes:
    """A manifest whose ``*l<levels-1>`` holds 9**levels leaves if walked without sharing."""
    leaves = ["x"] * 9
    anchors = "".join(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9 if i else leaves)}]\n"
                      for i in range(levels))
    return ("apiVersion: operations.kubeedge.io/v1alpha2\nkind: NodeUpgradeJob\nmetadata:\n"
            f"  name: job-a\n  labels:\n{anchors}spec:\n  version: v1.13.0\n{tail}").encode()


def refused_within(raw: bytes, limit: int = 2_500_000) -> None:
    """Refused within ``limit`` bytes allocated: work that does not grow with the
    aliases' expansion (a deterministic stand-in for "fails fast")."""
    tracemalloc.start()
    try:
        reason = refused(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit and len(reason) <= MAX_REASON


@pytest.mark.parametrize("tail", [
    "  nodeNames: *l9\n", "  checkItems: *l9\n", "  failureTolerate: *l9\n",
    "  nodeNames: [a]\n  concurrency: *l9\n", "  nodeNames: [a]\n  bogus: *l9\n",
    "  labelSelector: {matchExpressions: [{key: k, operator: In, values: *l9}]}\n",
    "  labelSelector: {matchLabels: {k: *l9}}\n", "  nodeNames: *l9\n  image: *l9\n",
])
def test_alias_bomb_fails_fast_and_bounded(tail: str) -> None:
    refused_within(bomb(10, tail))  # 9**10 leaves


@pytest.mark.parametrize("gatherer", ["{value: *l5}", "{arm64: *l5}"])
def test_alias_bomb_in_digest_is_bounded(gatherer: str) -> None:
    # 9**6 leaves only, so that the bug costs megabytes, not minutes.
    refused_within(bomb(6, f"  nodeNames: [a]\n  imageDigestGatter: {gatherer}\n"))


@pytest.mark.parametrize("raw", [b"[" * 5000 + b"]" * 5000,
                                 yaml.safe_dump(doc()).encode() + b"x: " + b"1" * 5000 + b"\n"])
def test_unreadable_yaml_is_a_manifest_error(raw: bytes) -> None:
    refused(raw, "manifest")


# -- selection and commands ------------------------------------------------------------

PRESENCE: dict[str, dict[str, Any]] = {
    "n2": {"online": True, "arch": "arm64", "labels": {"site": "b"}},
    "n1": {"online": True, "arch": "amd64", "labels": {"site": "a"}},
    "n0": {"online": False, "arch": "amd64", "labels": {"site": "a"}},
    "n3": {"online": True, "labels": "not a mapping"},
}


def test_select_nodes() -> None:
    got = select_nodes(parse(doc(nodeNames=["n2", "ghost", "n0", "n1"])), PRESENCE)
    assert [(s.name, s.phase) for s in got] == [
        ("n2", PENDING), ("ghost", FAIL), ("n0", FAIL), ("n1", PENDING)]
    assert "unknown node" in got[1].reason and "offline" in got[2].reason
    spec = parse(doc(nodeNames=["n1", "n2", "n3"], imageDigestGatter={"amd64": D1}))
    got = select_nodes(spec, PRESENCE)  # no digest for arm64, nor for an unknown arch
    assert [s.phase for s in got] == [PENDING, FAIL, FAIL]
    assert "arm64" in got[1].reason and "unknown" in got[2].reason
    got = select_nodes(parse(selector(matchLabels={"site": "a"})), PRESENCE)
    assert [(s.name, s.phase) for s in got] == [("n0", FAIL), ("n1", PENDING)]
    got = select_nodes(parse(expr("NotIn", "b", key="site")), PRESENCE)
    assert [s.name for s in got] == ["n0", "n1", "n3"]  # n3's labels read as none


def test_command_upgrade_and_prepull() -> None:
    spec = load_manifest(EXAMPLES / "nodeupgradejob-v1alpha2.yaml")
    assert command_for(spec, "upgrade", "n1", HID, "amd64") == {
        "schema": COMMAND_SCHEMA, "operation": "upgrade", "jobName": "upgrade-to-v1-13",
        "nodeName": "n1", "version": "v1.13.0", "historyID": HID, "timeoutSeconds": 600,
        "image": "registry.example.internal:5000/kubeedge/installation-package",
        "checkItems": ["cpu", "mem", "disk"], "requireConfirmation": False}
    spec = parse(doc(imageDigestGatter={"amd64": D1, "arm64": D2}, requireConfirmation=True))
    assert command_for(spec, "prepull", "n2", HID, "arm64") == {
        "schema": COMMAND_SCHEMA, "operation": "prepull", "jobName": "job-a", "nodeName": "n2",
        "version": "v1.13.0", "historyID": HID, "timeoutSeconds": 300, "imageDigest": D2}
    body = command_for(parse(doc(checkItems=["disk"])), "upgrade", "n1", HID, None)
    assert "image" not in body and "imageDigest" not in body
    assert (body["checkItems"], body["requireConfirmation"]) == (["disk"], False)


# -- the store -----------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "ctl" / "jobs.db")
    s.create_job("job-a", "upgrade", "manifest", HID, now=1.0, nodes=[
        ("n1", PENDING, ""), ("n2", PENDING, ""), ("n3", PENDING, ""), ("n4", FAIL, "unknown")])
    yield s
    s.close()


def report(seq: int, phase: str = "prechecked", *, final: bool = False, state: str = "InProgress",
           result: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"schema": "edge-upgrade-agent/report/v1", "jobKey": f"job-a/{HID}", "sequence": seq,
            "nodeName": "n1", "jobName": "job-a", "upgradeID": "job-a", "historyID": HID,
            "operation": "upgrade", "phase": phase, "state": state, "final": final,
            "result": result, "reason": f"reason {phase}", "fromVersion": "v1.12.1",
            "toVersion": "v1.13.0", "actionFlow": [], "timestamp": "2026-01-01T00:00:00Z",
            **extra}


SUCCEEDED = report(5, "succeeded", final=True, state="Successful", result="upgrade_success")
ROLLED_BACK = report(6, "rolled_back", final=True, state="Failure",
                     result="upgrade_failed_rollback_success")
REJECTION = report(1, "rejected", final=True, state="Failure",
                   result="upgrade_failed_rollback_success", historyID="",
                   jobKey="rejected:job-a:0123456789ab", toVersion=None, fromVersion=None)


def node(store: Store, name: str = "n1") -> NodeView:
    return {n.name: n for n in store.view("job-a").nodes}[name]


def test_create_job_refuses_a_duplicate(store: Store) -> None:
    with pytest.raises(ManifestError, match="exists already"):
        store.create_job("job-a", "upgrade", "m", HID, nodes=[], now=2.0)
    assert store.job_names() == ["job-a"] and node(store, "n4").finished_at == 1.0


@pytest.mark.parametrize(("who", "change"), [
    ("n1", {"jobName": "job-b"}), ("n1", {"historyID": "another-run"}), ("n9", {}),
    ("n1", {"sequence": "1"}), ("n1", {"sequence": True}),
    ("n1", {"jobKey": "rejected:job-b:0123456789ab", "historyID": ""}),
])
def test_reports_not_ours_are_ignored(store: Store, who: str, change: dict[str, Any]) -> None:
    assert store.record_report(who, report(1, **change), 2.0) is None
    assert node(store).phase is PENDING and not node(store).events


def test_redelivery_is_deduped_and_order_kept(store: Store) -> None:
    assert store.record_report("n1", report(2, "prechecked"), 2.0) == "job-a"
    assert node(store).phase is RUNNING  # dispatched by a controller that died
    assert store.record_report("n1", report(2, "prechecked"), 3.0) == "job-a"
    store.record_report("n1", report(4, "backed_up"), 4.0)
    store.record_report("n1", report(3, "image_ready"), 5.0)  # late, older
    n = node(store)
    assert (n.phase, n.last_action, len(n.events)) == (RUNNING, "backed_up", 3)


def test_final_reports(store: Store) -> None:
    store.record_report("n1", SUCCEEDED, 2.0)
    store.record_report("n2", ROLLED_BACK, 2.0)
    store.record_report("n1", report(1, "received"), 3.0)  # non-final after final
    store.record_report("n1", {**SUCCEEDED, "sequence": 8, "reason": "cancel refused"}, 4.0)
    ok, bad = node(store, "n1"), node(store, "n2")
    assert (ok.phase, ok.result, ok.finished_at, ok.reason) == (
        OK_, "upgrade_success", 2.0, "reason succeeded")
    assert (bad.phase, bad.result) == (FAIL, "upgrade_failed_rollback_success")
    assert (bad.from_version, bad.to_version) == ("v1.12.1", "v1.13.0")


def timed_out(store: Store) -> None:
    store.mark_dispatched("job-a", ["n1"], 2.0)
    store.finish_node("job-a", "n1", UNK, "The node task has timed out", 3.0)
    store.record_report("n1", report(2, "backed_up"), 4.0)


def test_late_final_report_replaces_unknown(store: Store) -> None:
    timed_out(store)
    assert node(store).phase is UNK
    store.record_report("n1", SUCCEEDED, 5.0)
    assert (node(store).phase, node(store).reason) == (OK_, "after the timeout: reason succeeded")


def test_late_progress_keeps_the_timeout_reason(store: Store) -> None:
    timed_out(store)
    assert node(store).reason.startswith("The node task has timed out")


def test_rejection_reports(store: Store) -> None:
    store.mark_dispatched("job-a", ["n1", "n2"], 2.0)
    assert store.record_report("n1", REJECTION, 3.0) == "job-a"
    n = node(store)
    assert (n.phase, n.last_action, n.reason, n.result) == (
        FAIL, "rejected", "reason rejected", "upgrade_failed_rollback_success")
    # A rejection while the node runs our command answers some other message.
    store.record_report("n2", report(1, "received"), 3.0)
    assert store.record_report("n2", REJECTION, 4.0) == "job-a"
    assert (node(store, "n2").phase, node(store, "n2").last_action) == (RUNNING, "received")


def test_dispatch_skip_and_events(store: Store) -> None:
    store.mark_dispatched("job-a", ["n4", "n1"], 2.0)  # n4 is not Pending: unchanged
    store.mark_dispatched("job-a", ["n1"], 9.0)
    n1, n4 = node(store, "n1"), node(store, "n4")
    assert (n1.phase, n1.dispatched_at, n1.last_action) == (RUNNING, 2.0, "dispatched")
    assert n4.phase is FAIL and n4.dispatched_at is None
    assert store.in_flight("job-a") == {"n1": (2.0, False)}
    assert store.skip_pending("job-a", "tolerance", 3.0) == 2
    assert [n.phase for n in store.view("job-a").nodes] == [RUNNING, SKIP, SKIP, FAIL]
    flow = [{"action": "Check", "succ": True, "reason": "image staged", "finishTime": "t"}]
    store.record_report("n1", report(2, actionFlow=flow), 4.0)
    assert store.in_flight("job-a") == {"n1": (4.0, True)}
    assert all(not n.events for n in store.view("job-a", events=False).nodes)
    (event,) = node(store).events
    assert (event.sequence, event.action_flow[0].action, event.received_at) == (2, "Check", 4.0)


def test_presence_round_trip(store: Store) -> None:
    store.record_presence("n2", {"online": True, "arch": "arm64"}, 5.0)
    store.record_presence("n1", {"online": True}, 5.0)
    store.record_presence("n1", {"online": False}, 6.0)
    assert store.presence() == {"n1": {"online": False, "_receivedAt": 6.0},
                                "n2": {"online": True, "arch": "arm64", "_receivedAt": 5.0}}


# -- job phase -----------------------------------------------------------------------

def counts(*phases: NodePhase) -> dict[NodePhase, int]:
    return {p: phases.count(p) for p in NodePhase}


@pytest.mark.parametrize(("phases", "tolerate", "phase"), [
    ((), 0.1, JobPhase.FAILURE), ((OK_, RUNNING), 0.1, JobPhase.IN_PROGRESS),
    ((FAIL, PENDING), 1.0, JobPhase.IN_PROGRESS),
    ((FAIL,) + (OK_,) * 8, 0.1, JobPhase.FAILURE),  # 1/9 → 0.11 > 0.1
    ((UNK,) + (OK_,) * 8, 0.1, JobPhase.FAILURE),  # Unknown counts as failed
    ((FAIL,) + (OK_,) * 9, 0.1, JobPhase.COMPLETED),  # 1/10 → 0.1
    ((FAIL,) + (OK_,) * 2, 0.33, JobPhase.COMPLETED),  # 1/3 → 0.33
    ((OK_, SKIP), 0.0, JobPhase.COMPLETED), ((FAIL, OK_), 0.0, JobPhase.FAILURE),
    ((FAIL, UNK), 1.0, JobPhase.COMPLETED),
])
def test_job_phase(phases: tuple[NodePhase, ...], tolerate: float, phase: JobPhase) -> None:
    assert job_phase(counts(*phases), tolerate) is phase


def test_job_phase_rounds_half_up_like_kubeedge() -> None:
    assert job_phase(counts(FAIL, *(OK_,) * 7), 0.12) is JobPhase.FAILURE


# -- views ---------------------------------------------------------------------------

def test_status_document(store: Store) -> None:
    flow = [{"action": "Check", "succ": True, "reason": "staged", "finishTime": "t1"},
            {"action": "Upgrade", "succ": False, "reason": "unhealthy", "finishTime": "t2"}]
    store.record_report("n1", SUCCEEDED, 2.0)
    store.record_report("n2", {**ROLLED_BACK, "actionFlow": flow}, 2.0)
    store.skip_pending("job-a", "tolerance", 3.0)
    store.set_job_phase("job-a", JobPhase.FAILURE, "1 of 4", 3.0)
    out = status_document(store.view("job-a"), API2)
    # The final status reads only each node's newest report with a flow: the same.
    assert status_document(store.view("job-a", events="last"), API2) == out
    assert (out["apiVersion"], out["kind"], out["metadata"]) == (API2, "NodeUpgradeJob",
                                                                 {"name": "job-a"})
    assert (out["status"]["phase"], out["status"]["reason"]) == ("Failure", "1 of 4")
    n1, n2, n3, n4 = out["status"]["nodeStatus"]
    assert n1 == {"nodeName": "n1", "phase": "Successful", "currentVersion": "v1.13.0",
                  "historicVersion": "v1.12.1", "reason": "reason succeeded", "actionFlow": [],
                  "result": "upgrade_success"}
    assert (n2["phase"], n2["currentVersion"], n2["result"]) == (
        "Failure", "v1.12.1", "upgrade_failed_rollback_success")
    assert n2["actionFlow"] == [
        {"action": "Check", "status": "True", "reason": "staged", "time": "t1"},
        {"action": "Upgrade", "status": "False", "reason": "unhealthy", "time": "t2"}]
    assert (n3["phase"], n3["currentVersion"], n3["reason"]) == ("Pending", "", "tolerance")
    assert (n4["phase"], n4["reason"], "result" in n4) == ("Failure", "unknown", False)


def job(*nodes: NodeView) -> JobView:
    return JobView("job-a", "upgrade", "v1.13.0", "a/b", JobPhase.IN_PROGRESS, 1, 0.1, 300,
                   0.0, 0.0, HID, nodes=nodes)


def test_table_orders_and_trims() -> None:
    view = job(*(NodeView(f"n{i}", p, dispatched_at=100.0)
                 for i, p in enumerate((OK_, RUNNING, FAIL, PENDING))))
    lines = table(view, at=190.0, width=60, max_rows=2)
    assert lines[0].startswith("job job-a: InProgress; 4 node(s): 1 Pending, 1 InProgress")
    assert lines[1].startswith("NODE") and lines[-1] == "... and 2 more"
    assert lines[2].split()[:2] == ["n1", "InProgress"] and "1m30s" in lines[2]
    assert lines[3].split()[:2] == ["n2", "Failure"]
    assert all(len(line) <= 60 for line in lines[1:])


def test_live_lines_only_on_change() -> None:
    out, quiet = io.StringIO(), io.StringIO()
    live = Live(out)  # a StringIO is no TTY
    live(job(NodeView("n0", PENDING), NodeView("n1", PENDING)))
    first = out.getvalue().splitlines()
    assert [line.split()[1:3] for line in first] == [["n0", "Pending"], ["n1", "Pending"]]
    live(job(NodeView("n0", PENDING), NodeView("n1", PENDING)))
    assert out.getvalue().splitlines() == first
    live(job(NodeView("n0", PENDING), NodeView("n1", OK_)))
    (new,) = out.getvalue().splitlines()[2:]
    assert new.split()[1:3] == ["n1", "Successful"]
    Live(quiet, tty=False, quiet=True)(job(NodeView("n0", PENDING)))
    assert quiet.getvalue() == ""


# -- settings ------------------------------------------------------------------------

def test_settings_defaults() -> None:
    s = parse_settings({})
    assert s == CtlSettings(mqtt=s.mqtt)  # every controller key at its default
    assert (s.client_id, s.shared_group, s.signing_key, s.signing_key_id) == (
        "cloud-controller", "", None, "")
    assert s.mqtt.ca_file == "/etc/edge-upgrade-ctl/tls/ca.crt"  # its own identity
    assert s.store_path == Path("/var/lib/edge-upgrade-ctl/jobs.db")
    assert (s.presence_settle_seconds, s.tick_seconds, s.signing_ttl_seconds) == (1.0, 0.5, 3600)
    assert s.wildcard("status") == "kubeedge/nodes/+/upgrade/status"
    assert parse_settings({"controller": {"shared_group": ""}}).shared_group == ""
    assert parse_settings({"controller": {"shared_group": "ctl_2"}}).shared_group == "ctl_2"


@pytest.mark.parametrize(("data", "needle"), [
    ({"bogus": 1}, "bogus: unknown key"), ({"controller": {"x": 1}}, "controller.x: unknown key"),
    ({"mqtt": {"topic_prefix": "fleet/upgrade"}}, "whole '{node}' level"),
    ({"mqtt": {"topic_prefix": "fleet/n-{node}/upgrade"}}, "whole '{node}' level"),
    ({"controller": {"shared_group": "$share/x"}}, "controller.shared_group"),
    ({"controller": {"shared_group": "a b"}}, "controller.shared_group"),
    ({"signing": {"key_file": "/etc/edge-upgrade-ctl/signing.pem"}}, "signing.key_id"),
])
def test_settings_refused(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(data)
    assert needle in err.value.reason


@pytest.mark.parametrize(("topic", "leaf", "node"), [
    ("kubeedge/nodes/n1/upgrade/status", "status", "n1"),
    ("kubeedge/nodes/e-2/upgrade/presence", "presence", "e-2"),
    ("kubeedge/nodes/n1/upgrade/cmd", "cmd", "n1"),
    ("kubeedge/nodes/n1/upgrade/status", "presence", None),
    ("other/nodes/n1/upgrade/status", "status", None),
    ("kubeedge/nodes/n1/other/status", "status", None),
    ("kubeedge/nodes/n1/upgraded/status", "status", None),
    ("kubeedge/nodes//upgrade/status", "status", None),
    ("kubeedge/nodes/upgrade/status", "status", None),
    ("kubeedge/nodes/a/b/upgrade/status", "status", None),
])
def test_node_of(topic: str, leaf: str, node: str | None) -> None:
    assert parse_settings({}).node_of(topic, leaf) == node
    for prefix, other in (("{node}/up", "n1/up/status"), ("fleet/{node}", "fleet/n1/status")):
        assert parse_settings({"mqtt": {"topic_prefix": prefix}}).node_of(other, "status") == "n1"


def test_parse_settings_leaves_its_input_alone() -> None:
    data: dict[str, Any] = {"mqtt": {"host": "broker"}}
    parse_settings(data)
    assert data == {"mqtt": {"host": "broker"}}


@pytest.mark.parametrize("raw", [b"mqtt: {host: \xff}\n", b"[" * 5000 + b"]" * 5000,
                                 b"controller: {tick_seconds: " + b"1" * 5000 + b"}\n"])
def test_unreadable_settings_are_config_errors(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / "ctl.yaml").write_bytes(raw)
    with pytest.raises(ConfigError):
        load_settings(tmp_path / "ctl.yaml")
