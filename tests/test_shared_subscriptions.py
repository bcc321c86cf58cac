"""Controller replicas behind one shared subscription, on the real mosquitto (docs/scaling.md).

Two replicas (CN ``cloud-controller`` and ``cloud-controller-2``, each its own
certificate and session) subscribe to ``$share/edge-upgrade-ctl/.../status``;
node clients publish reports with their own certificates; the broker is
testkit's mosquitto with mutual TLS and the production ACL. Every wait is
bounded; nothing asserts on time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from testkit.broker import Broker, running_broker
from testkit.pki import Pki, issue_client, make_pki

WAIT_S = 10.0
GROUP = "edge-upgrade-ctl"
SHARED_STATUS = f"$share/{GROUP}/kubeedge/nodes/+/upgrade/status"
REPLICAS = ("cloud-controller", "cloud-controller-2")
SESSION_S = 300
GRANTED_QOS1 = [1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    issue_client(pki, "cloud-controller-2")
    return pki


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path, pki=pki) as b:
        yield b


class Client:
    """One MQTT v5 client with its own certificate; callbacks become bounded waits.

    All clients share one condition, so a wait may look at several of them
    (e.g. "every report reached one replica or the other").
    """

    cond = threading.Condition()

    def __init__(self, broker: Broker, cn: str, *, manual_ack: bool = False) -> None:
        self.broker, self.cn = broker, cn
        self.mqtt = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cn, protocol=mqtt.MQTTv5,
                                reconnect_on_failure=False, manual_ack=manual_ack)
        self.mqtt.tls_set_context(broker.client_tls(cn))
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_disconnect = self._on_disconnect
        self.mqtt.on_publish = self._on_publish
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_message = self._on_message
        self.connack: ReasonCode | None = None
        self.session_present = False
        self.disconnected = False
        self.acks: dict[int, list[int]] = {}  # mid -> PUBACK / SUBACK reason codes
        self.got: list[tuple[str, bool]] = []  # (payload, dup), in arrival order

    def _notify(self, change: Callable[[], None]) -> None:
        with self.cond:
            change()
            self.cond.notify_all()

    def _on_connect(self, _c: mqtt.Client, _u: Any, flags: mqtt.ConnectFlags,
                    rc: ReasonCode, _p: Properties | None) -> None:
        self.session_present = flags.session_present
        self._notify(lambda: setattr(self, "connack", rc))

    def _on_disconnect(self, *_: Any) -> None:
        self._notify(lambda: setattr(self, "disconnected", True))

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Properties) -> None:
        self._notify(lambda: self.acks.__setitem__(mid, [rc.value]))

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode],
                      _p: Properties) -> None:
        self._notify(lambda: self.acks.__setitem__(mid, [rc.value for rc in rcs]))

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._notify(lambda: self.got.append((msg.payload.decode(), bool(msg.dup))))

    def wait(self, what: str, predicate: Callable[[], bool]) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout=WAIT_S):
                raise AssertionError(f"{self.cn}: no {what}\n{self.broker.log_tail()}")

    def connect(self, *, persistent: bool = False, expiry: int = SESSION_S) -> Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = expiry if persistent else 0
        self.mqtt.connect(self.broker.host, self.broker.port, clean_start=not persistent,
                          properties=props)
        self.mqtt.loop_start()
        self.wait("CONNACK", lambda: self.connack is not None)
        assert self.connack is not None and not self.connack.is_failure, self.connack
        return self

    def subscribe(self, topic: str) -> list[int]:
        _, mid = self.mqtt.subscribe(topic, qos=1)
        assert mid is not None
        self.wait(f"SUBACK for {topic}", lambda: mid in self.acks)
        return self.acks[mid]

    def publish(self, topic: str, payload: str) -> int:
        """QoS 1 publish; the PUBACK reason code."""
        info = self.mqtt.publish(topic, payload, qos=1)
        self.wait(f"PUBACK for {payload}", lambda: info.mid in self.acks)
        return self.acks[info.mid][0]

    def payloads(self) -> set[str]:
        with self.cond:
            return {p for p, _ in self.got}

    def close(self) -> None:
        """DISCONNECT (a persistent session stays on the broker) and stop the thread."""
        if self.connack is not None and not self.disconnected:
            self.mqtt.disconnect()
            self.wait("disconnect", lambda: self.disconnected)
        self.mqtt.loop_stop()


@pytest.fixture
def clients(broker: Broker) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(cn: str, **kw: Any) -> Client:
        made.append(Client(broker, cn, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


def report(node: Client, n: int, tag: str = "r") -> str:
    """One report from ``node`` on its own status topic; it must be accepted (reason 0)."""
    payload = f"{node.cn}:{tag}{n}"
    assert node.publish(node.broker.topic(node.cn, "status"), payload) == 0
    return payload


def replicas(clients: Callable[..., Client], *, expiry: int = SESSION_S,
             manual_ack: bool = False) -> tuple[Client, Client]:
    """Both replicas, persistent sessions, in the group; only the first acks by hand."""
    a = clients(REPLICAS[0], manual_ack=manual_ack).connect(persistent=True, expiry=expiry)
    b = clients(REPLICAS[1]).connect(persistent=True)
    for r in (a, b):
        assert r.subscribe(SHARED_STATUS) == GRANTED_QOS1
    return a, b


def test_each_report_reaches_exactly_one_replica(clients: Callable[..., Client]) -> None:
    a, b = replicas(clients)
    nodes = [clients(cn).connect() for cn in ("node-1", "node-2")]
    sent = {report(nodes[i % 2], i) for i in range(12)}
    a.wait("all reports", lambda: a.payloads() | b.payloads() == sent)
    assert len(a.got) + len(b.got) == len(sent)  # no report twice
    assert not a.payloads() & b.payloads()
    # mosquitto 2.0.11 deals the group's messages round robin, one member after the other.
    assert len(a.got) == len(b.got) == len(sent) // 2


def test_share_prefix_does_not_widen_a_nodes_read_access(
        broker: Broker, clients: Callable[..., Client]) -> None:
    ctl = clients("cloud-controller").connect()
    assert ctl.subscribe(SHARED_STATUS) == GRANTED_QOS1
    node1, node2 = (clients(cn).connect() for cn in ("node-1", "node-2"))
    # Granted (acl_file does not check SUBSCRIBE in 2.0.11); read access is checked per message.
    assert node2.subscribe("$share/x/kubeedge/nodes/+/upgrade/status") == GRANTED_QOS1
    assert node2.subscribe("$share/x/kubeedge/nodes/+/upgrade/cmd") == GRANTED_QOS1
    mine = report(node1, 0)
    ctl.wait("node-1's report", lambda: mine in ctl.payloads())
    assert ctl.publish(broker.topic("node-1", "cmd"), "for-1") == 0
    assert ctl.publish(broker.topic("node-2", "cmd"), "for-2") == 0
    # One ordered queue per client: had node-1's report or command been allowed,
    # they would have reached node-2 before its own, later, command.
    node2.wait("its own command", lambda: "for-2" in node2.payloads())
    assert node2.payloads() == {"for-2"}


def test_a_node_in_the_controllers_group_swallows_its_turn(
        clients: Callable[..., Client]) -> None:
    """Known weakness of mosquitto's acl_file: nothing stops a node joining the group."""
    a, b = replicas(clients)
    intruder = clients("node-2").connect()
    assert intruder.subscribe(SHARED_STATUS) == GRANTED_QOS1
    node = clients("node-1").connect()
    sent = [report(node, i) for i in range(12)]  # every PUBACK says success (0)
    intruder.close()  # its session ends, and with it its place in the group
    # Each replica's queue is ordered: once both have a marker, all before it is in.
    markers = {report(node, i, "marker") for i in range(2)}
    a.wait("markers", lambda: markers <= a.payloads() | b.payloads())
    assert markers & a.payloads() and markers & b.payloads()
    lost = set(sent) - a.payloads() - b.payloads()
    assert intruder.got == []
    # The intruder's turn came every third report; read access was denied, so
    # mosquitto dropped the report instead of giving it to another member.
    assert len(lost) == len(sent) // 3


def test_offline_replicas_share_waits_in_its_session(clients: Callable[..., Client]) -> None:
    a, b = replicas(clients, manual_ack=True)  # A never acks: it "crashes" before committing
    node = clients("node-1").connect()
    first = {report(node, i, "a") for i in range(4)}
    a.wait("first batch", lambda: a.payloads() | b.payloads() == first)
    unacked, b_before = a.payloads(), b.payloads()
    a.close()
    second = {report(node, i, "b") for i in range(4)}
    b.wait("its share of the second batch", lambda: len(b.payloads()) > len(b_before))
    back = clients(REPLICAS[0]).connect(persistent=True)  # no new SUBSCRIBE
    assert back.session_present
    back.wait("everything", lambda: back.payloads() | b.payloads() == first | second)
    # A's unacked reports came back to A (DUP set), never to B ...
    assert unacked and unacked <= back.payloads() and not unacked & b.payloads()
    assert all(dup for p, dup in back.got if p in unacked)
    # ... and A's turns while it was away were queued in its session, not given to B.
    assert back.payloads() & second and not back.payloads() & b.payloads()
    assert len(b.got) == len(b.payloads()) < len(first | second)


def test_replica_past_its_session_expiry_loses_its_share(
        broker: Broker, clients: Callable[..., Client]) -> None:
    gone, b = replicas(clients, expiry=2)  # the 4 reports take far less than 2 s
    mark = broker.log_mark()
    gone.close()
    node = clients("node-1").connect()
    sent = {report(node, i) for i in range(4)}
    b.wait("its share", lambda: len(b.payloads()) >= len(sent) // 2)
    broker.wait_for_log(r"Expiring client cloud-controller due to timeout", since=mark)
    back = clients(REPLICAS[0]).connect(persistent=True)
    assert not back.session_present
    assert back.subscribe(SHARED_STATUS) == GRANTED_QOS1
    marker = report(node, 0, "marker")
    back.wait("the marker", lambda: marker in back.payloads() | b.payloads())
    # The reports queued in the expired session are gone with it.
    assert not back.payloads() & sent and len(b.payloads() & sent) == len(sent) // 2
