"""KubeEdge's upgrade messages (eras A, B, C) into Commands, and v1alpha2 reports out."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import parse_config
from agent.errors import InvalidCommand
from agent.messages.commands import Command, Operation
from agent.messages.kubeedge import parse_kubeedge, upstream_action_message

NODE = "edge-node1"
CONFIG = parse_config({"node_name": NODE, "images": {
    "allowed_registries": ["docker.io", "registry.example.internal:5000"]}})
REPO = "kubeedge/installation-package"
PRIVATE = "registry.example.internal:5000/kubeedge/installation-package"
AMD = "sha256:" + "a" * 64
ARM = "sha256:" + "b" * 64
HID = "5f0c2a0e-3b1d-4c5e-9f7a-1b2c3d4e5f60"
SAMPLE = Path("/work/shared/examples/nodeupgradejob-v1alpha2.yaml")


def parse(data: dict[str, Any], arch: str = "amd64") -> Command | None:
    return parse_kubeedge(data, CONFIG, "kubeedge", arch=arch)


def reject(data: dict[str, Any], reason: str, arch: str = "amd64") -> None:
    with pytest.raises(InvalidCommand) as err:
        parse(data, arch)
    assert reason in err.value.reason


def request(**extra: Any) -> dict[str, Any]:
    """An Era A NodeUpgradeJobRequest as KubeEdge's cloud fills it."""
    return {"UpgradeID": "job-a", "HistoryID": HID, "Version": "v1.13.0",
            "UpgradeTool": "", "Image": f"{REPO}:v1.13.0", **extra}


def beehive(resource: str, operation: str, content: Any, group: str = "taskmanager"
            ) -> dict[str, Any]:
    return {
        "header": {"msg_id": str(uuid.uuid4()), "parent_msg_id": "", "timestamp": 1,
                   "resourceversion": "", "sync": False, "type": ""},
        "route": {"source": group, "destination": "", "group": group,
                  "operation": operation, "resource": resource},
        "content": content,
    }


def era_a(content: Any, job: str = "job-a", node: str = NODE) -> dict[str, Any]:
    return beehive(f"upgrade/{job}/node/{node}", "upgrade", content, "nodeupgradejobcontroller")


def era_b(state: str = "Init", item: Any = None, job: str = "job-a", node: str = NODE,
          **extra: Any) -> dict[str, Any]:
    task = {"TaskID": job, "Type": "upgrade", "State": state,
            "Item": request() if item is None else item, **extra}
    return beehive(f"upgrade/{job}/node/{node}", "upgrade", task)


def era_c(spec: Any, job: str = "job-c", node: str = NODE, operation: str = "Check"
          ) -> dict[str, Any]:
    resource = f"operations.kubeedge.io/v1alpha2/nodeupgradejob/{job}/node/{node}"
    return beehive(resource, operation, spec)


def expect(cmd: Command | None, *, job: str, history: str = "", repo: str = REPO,
           digest: str | None = None, timeout: int = 300, checks: tuple[str, ...] = (),
           confirm: bool = False) -> None:
    assert cmd is not None
    assert cmd.operation == Operation.UPGRADE
    assert (cmd.job_name, cmd.node_name, cmd.history_id) == (job, NODE, history)
    assert str(cmd.version) == "v1.13.0"
    assert (cmd.image.repo, cmd.image.tag, cmd.image.digest) == (repo, None, None)
    assert cmd.image_digest == digest
    assert cmd.timeout_seconds == timeout
    assert cmd.check_items == checks
    assert cmd.require_confirmation is confirm
    assert (cmd.upgrade_tool, cmd.dry_run, cmd.source) == ("", False, "kubeedge")


# ------------------------------------------------------------------ accepted shapes


@pytest.mark.parametrize("tool", ["", "keadm", "KEADM"])
def test_era_a_bare_request(tool: str) -> None:
    expect(parse(request(UpgradeTool=tool)), job="job-a", history=HID)


def test_era_b_bare_request_with_digest_and_confirmation() -> None:
    cmd = parse(request(ImageDigest=AMD, RequireConfirmation=True))
    expect(cmd, job="job-a", history=HID, digest=AMD, confirm=True)


@pytest.mark.parametrize("encode", [False, True])
def test_era_a_beehive_object_or_json_text(encode: bool) -> None:
    content = json.dumps(request()) if encode else request()
    expect(parse(era_a(content)), job="job-a", history=HID)


def test_era_a_without_image_uses_default_repo() -> None:
    expect(parse(era_a(request(Image=""))), job="job-a", history=HID)


@pytest.mark.parametrize("state", ["", "Init", "Upgrading"])
def test_era_b_task_request_starts_the_flow(state: str) -> None:
    item = request(Image=f"{PRIVATE}:v1.13.0", ImageDigest=ARM, RequireConfirmation=True)
    cmd = parse(era_b(state, item))
    expect(cmd, job="job-a", history=HID, repo=PRIVATE, digest=ARM, confirm=True)


@pytest.mark.parametrize(("arch", "digest"), [("amd64", AMD), ("arm64", ARM)])
def test_era_c_full_spec(arch: str, digest: str) -> None:
    spec = {"version": "v1.13.0", "image": PRIVATE, "timeoutSeconds": 600,
            "imageDigestGatter": {"amd64": AMD, "arm64": ARM, "registryAPI": None},
            "checkItems": ["cpu", "disk", "cpu"], "requireConfirmation": True,
            "nodeNames": [NODE], "labelSelector": None, "concurrency": 2,
            "failureTolerate": "0.1"}
    expect(parse(era_c(spec), arch), job="job-c", repo=PRIVATE, digest=digest, timeout=600,
           checks=("cpu", "disk"), confirm=True)


@pytest.mark.parametrize("timeout", [None, 0])
def test_era_c_minimal_spec_takes_defaults(timeout: int | None) -> None:
    spec = {"version": "v1.13.0", "timeoutSeconds": timeout, "image": "",
            "imageDigestGatter": None, "checkItems": None}
    # image "" makes KubeEdge pull ":v1.13.0"; the agent uses the default repo.
    expect(parse(era_c(spec)), job="job-c")


def test_era_c_v1alpha1_digest_value() -> None:
    spec = {"version": "v1.13.0", "imageDigestGatter": {"value": ARM}}
    expect(parse(era_c(spec), "amd64"), job="job-c", digest=ARM)


def test_era_c_json_text_content() -> None:
    expect(parse(era_c(json.dumps({"version": "v1.13.0"}))), job="job-c")


def test_kubeedge_sample_spec() -> None:
    spec = yaml.safe_load(SAMPLE.read_text())["spec"]
    expect(parse(era_c(spec, job="upgrade-to-v1-13")), job="upgrade-to-v1-13", repo=PRIVATE,
           timeout=600, checks=("cpu", "mem", "disk"))


@pytest.mark.parametrize("data", [
    {}, {"jobName": "job-a", "version": "v1.13.0"}, {"route": {}}, {"content": {}},
    {"upgradeID": "job-a"},  # Go matches case-insensitively; we take KubeEdge's spelling
])
def test_other_shapes_are_not_kubeedge(data: dict[str, Any]) -> None:
    assert parse(data) is None


# ------------------------------------------------------------------ rejections

SPEC = {"version": "v1.13.0"}


@pytest.mark.parametrize(("data", "reason"), [
    (era_a(request(), node="edge-node2"), "command is for node 'edge-node2', this is 'edge-node1'"),
    (era_c(SPEC, node="edge-node2"), "command is for node 'edge-node2'"),
    (era_c(SPEC, node=""), "bad node name ''"),
    (era_a(request(), node="Edge_1"), "bad node name 'Edge_1'"),
    (era_c(SPEC, job="Job!"), "bad job name 'Job!'"),
    (era_a(request(UpgradeID="job-b")), "UpgradeID 'job-b' does not match job 'job-a'"),
    (era_b(item=request(UpgradeID="job-b")), "UpgradeID 'job-b' does not match job 'job-a'"),
    (era_b(TaskID="job-b"), "TaskID 'job-b' does not match job 'job-a'"),
    (request(UpgradeID=""), "empty UpgradeID"),
    (era_a({"Version": "v1.13.0"}), "empty UpgradeID"),
    (era_b(item=request(UpgradeID="")), "empty UpgradeID"),
])
def test_names_and_ids(data: dict[str, Any], reason: str) -> None:
    reject(data, reason)


@pytest.mark.parametrize("version", ["v1.13", "v1.13.0;reboot", "1.13.0", ""])
def test_bad_versions(version: str) -> None:
    want = "bad version string" if version else "upgrade needs a version"
    reject(request(Version=version), want)
    reject(era_b(item=request(Version=version)), want)
    reject(era_c({"version": version}), want)


@pytest.mark.parametrize(("state", "item"), [
    ("Checking", {"CheckItem": ["cpu", "mem"]}), ("BackingUp", None), ("RollingBack", None),
])
def test_per_stage_messages(state: str, item: Any) -> None:
    reject(era_b(state, item), f"KubeEdge per-stage message {state} is not needed: "
           "the agent runs the whole flow from the first message")


@pytest.mark.parametrize(("data", "reason"), [
    (era_c(SPEC, operation="Upgrade"), "unknown operation 'Upgrade' for nodeupgradejob"),
    (era_a(request()) | {"route": era_a(request())["route"] | {"operation": "delete"}},
     "unknown operation 'delete' for upgrade"),
    (beehive(f"prepull/job-a/node/{NODE}", "prepull", {"TaskID": "job-a"}),
     "unknown operation 'prepull' for prepull"),
    (era_b(Type="prepull"), "unknown operation 'prepull' for NodeTaskRequest"),
    (era_b("Successful"), "unknown NodeTaskRequest.State 'Successful'"),
    (beehive(f"operations.kubeedge.io/v1alpha1/nodeupgradejob/job-c/node/{NODE}", "Check",
             SPEC), "unsupported KubeEdge resource"),
    (beehive("default/pod/nginx", "update", {}), "unsupported KubeEdge resource"),
])
def test_unknown_operations_and_resources(data: dict[str, Any], reason: str) -> None:
    reject(data, reason)


@pytest.mark.parametrize(("gatherer", "arch", "reason"), [
    ({"registryAPI": {"host": "r.example", "token": "t"}}, "amd64",
     "imageDigestGatter.registryAPI is not supported; give the digest"),
    ({"arm64": ARM}, "amd64", "imageDigestGatter has no digest for amd64"),
    ({"amd64": AMD}, "riscv64", "imageDigestGatter has no digest for riscv64"),
    ({"value": AMD, "amd64": AMD}, "amd64", "gives both value and per-arch digests"),
    ({"amd64": "sha256:short"}, "amd64", "bad image digest"),
    ({"amd": AMD}, "amd64", "unknown imageDigestGatter field 'amd'"),
    ("sha256:x", "amd64", "imageDigestGatter must be an object"),
])
def test_digest_gatherer(gatherer: Any, arch: str, reason: str) -> None:
    reject(era_c({"version": "v1.13.0", "imageDigestGatter": gatherer}), reason, arch)


@pytest.mark.parametrize(("data", "reason"), [
    (era_a(["UpgradeID"]), "content must be an object"),
    (era_a("{not json"), "content is a string but not a JSON document"),
    (era_a('"text"'), "content must be an object"),
    (era_a(request()) | {"route": "upgrade"}, "message.route must be an object"),
    (era_a(request()) | {"header": []}, "message.header must be an object"),
    (era_a(request()) | {"extra": 1}, "unknown message field 'extra'"),
    (era_a(request()) | {"route": {"resource": ["upgrade"]}}, "route.resource must be a string"),
    (request(Version=1.13), "NodeUpgradeJobRequest.Version must be a string"),
    (request(UpgradeID=["job-a"]), "NodeUpgradeJobRequest.UpgradeID must be a string"),
    (request(RequireConfirmation="yes"), "RequireConfirmation must be a boolean"),
    (request(Extra=""), "unknown NodeUpgradeJobRequest field 'Extra'"),
    (request(UpgradeTool="ansible"), "unknown upgradeTool 'ansible'"),
    (request(HistoryID="no spaces"), "bad historyID"),
    (era_b(item=["x"]), "NodeTaskRequest.Item must be an object"),
    (era_b(State=3), "NodeTaskRequest.State must be a string"),
    (era_b(item=request(Version=[])), "NodeTaskRequest.Item.Version must be a string"),
    (era_c({"version": "v1.13.0", "checkItems": "cpu"}), "checkItems must be a list"),
    (era_c({"version": "v1.13.0", "checkItems": [1]}), "checkItems must be a list of strings"),
    (era_c({"version": "v1.13.0", "checkItems": ["gpu"]}), "unknown checkItem 'gpu'"),
    (era_c({"version": "v1.13.0", "timeoutSeconds": "600"}), "timeoutSeconds must be an integer"),
    (era_c({"version": "v1.13.0", "timeoutSeconds": True}), "timeoutSeconds must be an integer"),
    (era_c({"version": "v1.13.0", "timeoutSeconds": 6.5}), "timeoutSeconds must be an integer"),
    (era_c({"version": "v1.13.0", "timeoutSeconds": -1}), "bad timeoutSeconds -1"),
    (era_c({"version": "v1.13.0", "timeoutSeconds": 2**32}), "bad timeoutSeconds"),
    (era_c({"version": "v1.13.0", "requireConfirmation": 1}), "must be a boolean"),
    (era_c({"version": "v1.13.0", "image": "Bad Repo"}), "bad image reference"),
    (era_c({"version": "v1.13.0", "upgradeTool": "keadm"}),
     "unknown NodeUpgradeJobSpec field 'upgradeTool'"),
    (era_c(["v1.13.0"]), "content must be an object"),
])
def test_wrong_types_and_values(data: dict[str, Any], reason: str) -> None:
    reject(data, reason)


@pytest.mark.parametrize("data", [
    era_c({"version": "v1.13.0", "x" * 10_000: 1}),
    era_c({"version": "v1." + "3" * 10_000 + ".0"}),
    era_c(SPEC, job="j" * 10_000),
    beehive("x" * 10_000, "Check", SPEC),
])
def test_reasons_quote_wire_values_briefly(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidCommand) as err:
        parse(data)
    assert 10 < len(err.value.reason) <= 240


# ------------------------------------------------------------------ arbitrary input

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)
# Mostly KubeEdge's own keys with plausible values, so that the fuzzing reaches
# past the shape checks into build_command and out as Commands too.
VALUE = JSON | st.sampled_from(["v1.13.0", "job-a", "job-c", NODE, "", "keadm", AMD, REPO,
                                "Init", "Checking", "upgrade", True, 0, 600, ["cpu"],
                                {"amd64": AMD}, {"registryAPI": {}}])


def fields(*keys: str, base: dict[str, Any] | None = None) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), VALUE, max_size=4).map(
        lambda d: {**(base or {}), **d})


REQUESTS = fields("UpgradeID", "HistoryID", "Version", "UpgradeTool", "Image", "ImageDigest",
                  "RequireConfirmation", base=request())
TASKS = fields("TaskID", "Type", "State", "Item",
               base={"TaskID": "job-a", "Type": "upgrade", "State": "", "Item": request()})
SPECS = fields("version", "image", "timeoutSeconds", "imageDigestGatter", "checkItems",
               "requireConfirmation", "concurrency", base={"version": "v1.13.0"})
LOOSE = st.dictionaries(st.sampled_from(["route", "content", "UpgradeID", "version"])
                       | st.text(max_size=8), JSON, max_size=5)
ROUTES = st.sampled_from([
    (f"upgrade/job-a/node/{NODE}", "upgrade"), (f"prepull/job-a/node/{NODE}", "prepull"),
    ("upgrade/job-a/node/", "upgrade"), ("a/b", ""), (f"upgrade/job-a/node/{NODE}", "Check"),
    (f"operations.kubeedge.io/v1alpha2/nodeupgradejob/job-c/node/{NODE}", "Check"),
])
MESSAGES = st.builds(
    lambda route, content, text: beehive(route[0], route[1],
                                         json.dumps(content) if text else content),
    ROUTES, REQUESTS | TASKS | SPECS | JSON, st.booleans(),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=LOOSE | MESSAGES | REQUESTS)
def test_arbitrary_input_only_ever_yields_none_command_or_invalid(data: dict[str, Any]) -> None:
    try:
        result = parse(data)
    except InvalidCommand as exc:
        assert exc.reason
        return
    assert result is None or isinstance(result, Command)
    if result is None:
        assert not ("route" in data and "content" in data) and "UpgradeID" not in data


# ------------------------------------------------------------------ upstream


def test_upstream_action_message_reports_the_last_action() -> None:
    report = {"jobName": "job-c", "final": False, "actionFlow": [
        {"action": "Check", "succ": True, "reason": "", "finishTime": "2026-01-01T00:00:00Z",
         "extend": ""},
        {"action": "BackUp", "succ": False, "reason": "disk full",
         "finishTime": "2026-01-01T00:00:05Z", "extend": "v1.12.1,v1.13.0"},
    ]}
    msg = upstream_action_message(report, NODE)
    assert msg is not None
    assert set(msg) == {"header", "route", "content"}
    header = msg["header"]
    assert uuid.UUID(header["msg_id"]).version == 4
    assert (header["parent_msg_id"], header["sync"]) == ("", False)
    assert isinstance(header["timestamp"], int) and header["timestamp"] > 1_700_000_000_000
    assert msg["route"] == {
        "source": "websocket", "group": "hub", "operation": "UpdateNodeActionStatus",
        "resource": f"operations.kubeedge.io/v1alpha2/nodeupgradejob/job-c/node/{NODE}",
    }
    assert msg["content"] == {"action": "BackUp", "succ": False, "reason": "disk full",
                              "finishTime": "2026-01-01T00:00:05Z", "extend": "v1.12.1,v1.13.0"}
    json.dumps(msg)  # wire-ready


def test_upstream_action_message_without_actions() -> None:
    assert upstream_action_message({"jobName": "job-c", "actionFlow": []}, NODE) is None
    assert upstream_action_message({"jobName": "job-c"}, NODE) is None
