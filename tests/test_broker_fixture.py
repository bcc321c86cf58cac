"""The test broker (testkit/broker.py) and PKI (testkit/pki.py) behave like production.

Plain paho-mqtt clients, MQTT v5 over mutual TLS against a real mosquitto.
Waits are bounded events (they only bound a hang; nothing asserts on time).
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from testkit.broker import Broker, running_broker
from testkit.pki import Pki, make_other_ca, make_pki

WAIT_S = 10.0
NOT_AUTHORIZED = 135


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path, pki=pki) as b:
        yield b


class Client:
    """A paho client with its callbacks turned into bounded waits."""

    def __init__(self, broker: Broker, cn: str, *, tls: ssl.SSLContext | None = None) -> None:
        self.broker = broker
        # No automatic reconnect: each test connects explicitly, and a refused
        # client's network thread then ends at once.
        self.mqtt = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cn,
                                protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        self.mqtt.tls_set_context(tls or broker.client_tls(cn))
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_connect_fail = self._on_connect_fail
        self.mqtt.on_disconnect = self._on_disconnect
        self.mqtt.on_publish = self._on_publish
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_message = self._on_message
        self.lock = threading.Condition()
        self.connack: ReasonCode | None = None
        self.session_present = False
        self.done = threading.Event()  # CONNACK, failure or disconnect: the attempt is over
        self.disconnected = threading.Event()
        self.pubacks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.messages: list[tuple[str, bytes]] = []

    # callbacks (paho's network thread)
    def _on_connect(self, _c: mqtt.Client, _u: Any, flags: mqtt.ConnectFlags,
                    rc: ReasonCode, _p: Properties | None) -> None:
        self.connack, self.session_present = rc, flags.session_present
        self.done.set()

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        self.done.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: mqtt.DisconnectFlags,
                       _rc: ReasonCode, _p: Properties | None) -> None:
        self.disconnected.set()
        self.done.set()

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Properties) -> None:
        with self.lock:
            self.pubacks[mid] = rc.value
            self.lock.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode],
                      _p: Properties) -> None:
        with self.lock:
            self.subacks[mid] = [rc.value for rc in rcs]
            self.lock.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.lock.notify_all()

    # test side
    def _wait(self, what: str, predicate: Any) -> None:
        with self.lock:
            if not self.lock.wait_for(predicate, timeout=WAIT_S):
                raise AssertionError(f"no {what}\n{self.broker.log_tail()}")

    def connect(self, *, clean_start: bool = True, session_expiry: int = 0) -> bool:
        """Connect; True on CONNACK success, False when refused (TLS or MQTT)."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry
        self.done.clear()
        self.disconnected.clear()
        self.connack = None
        try:
            self.mqtt.connect(self.broker.host, self.broker.port, clean_start=clean_start,
                              properties=props)
        except (ssl.SSLError, OSError):
            return False  # TLS 1.2: the broker refuses during the handshake
        self.mqtt.loop_start()
        assert self.done.wait(WAIT_S), f"connect never settled\n{self.broker.log_tail()}"
        return self.accepted()

    def accepted(self) -> bool:
        """The last CONNACK was a success (set from paho's thread)."""
        return self.connack is not None and not self.connack.is_failure

    def close(self) -> None:
        if self.connack is not None and not self.disconnected.is_set():
            self.mqtt.disconnect()
            self.disconnected.wait(WAIT_S)
        self.mqtt.loop_stop()

    def publish(self, topic: str, payload: bytes) -> int:
        """QoS 1 publish; returns the PUBACK reason code."""
        info = self.mqtt.publish(topic, payload, qos=1)
        self._wait(f"PUBACK for {topic}", lambda: info.mid in self.pubacks)
        return self.pubacks[info.mid]

    def subscribe(self, topic: str) -> list[int]:
        _, mid = self.mqtt.subscribe(topic, qos=1)
        assert mid is not None
        self._wait(f"SUBACK for {topic}", lambda: mid in self.subacks)
        return self.subacks[mid]

    def wait_message(self, topic: str, payload: bytes) -> None:
        self._wait(f"message {payload!r} on {topic}",
                   lambda: (topic, payload) in self.messages)


def refused(broker: Broker, tls: ssl.SSLContext, cn: str = "node-1") -> bool:
    client = Client(broker, cn, tls=tls)
    try:
        return not client.connect()
    finally:
        client.close()


def test_node_with_valid_certificate_connects(broker: Broker) -> None:
    node = Client(broker, "node-1")
    try:
        assert node.connect()
    finally:
        node.close()
    broker.wait_for_log(r"New client connected .* as node-1 .*u'node-1'")


def test_client_without_certificate_or_from_another_ca_is_refused(
        broker: Broker, tmp_path: Path) -> None:
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(cafile=str(broker.pki.ca_cert))
    assert refused(broker, no_cert)

    other = make_other_ca(tmp_path / "other-ca")
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.load_verify_locations(cafile=str(broker.pki.ca_cert))  # still trusts the server
    foreign.load_cert_chain(*(str(p) for p in other.client("node-1")))
    assert refused(broker, foreign)

    log = broker.log_tail(200)
    assert "peer did not return a certificate" in log
    assert "certificate verify failed" in log
    assert "New client connected" not in log


def test_acl_confines_each_node_to_its_own_topics(broker: Broker) -> None:
    node1, node2, ctl = (Client(broker, cn) for cn in ("node-1", "node-2", "cloud-controller"))
    try:
        for c in (node1, node2, ctl):
            assert c.connect()
        # Wildcard subscription is accepted; the ACL filters what is delivered.
        assert node1.subscribe(broker.topic("+", "cmd")) == [1]
        assert node2.subscribe(broker.topic("node-2", "cmd")) == [1]
        assert ctl.subscribe(broker.topic("+", "status")) == [1]

        assert node1.publish(broker.topic("node-2", "status"), b"forged") == NOT_AUTHORIZED
        assert node1.publish(broker.topic("node-1", "status"), b"mine") == 0
        ctl.wait_message(broker.topic("node-1", "status"), b"mine")

        assert ctl.publish(broker.topic("node-2", "cmd"), b"for-2") == 0
        assert ctl.publish(broker.topic("node-1", "cmd"), b"for-1") == 0
        node2.wait_message(broker.topic("node-2", "cmd"), b"for-2")
        # Messages to one client are delivered in order: once for-1 arrived,
        # for-2 (published first) would have arrived too had it been allowed.
        node1.wait_message(broker.topic("node-1", "cmd"), b"for-1")
        assert node1.messages == [(broker.topic("node-1", "cmd"), b"for-1")]
        assert (broker.topic("node-2", "status"), b"forged") not in ctl.messages
        # A node may not command another node.
        assert node1.publish(broker.topic("node-2", "cmd"), b"evil") == NOT_AUTHORIZED
    finally:
        for c in (node1, node2, ctl):
            c.close()


def test_queued_command_survives_reconnect_restart_and_saved_crash(
        broker: Broker) -> None:
    cmd = broker.topic("node-1", "cmd")
    node = Client(broker, "node-1")
    assert node.connect(clean_start=False, session_expiry=3600)
    assert node.subscribe(cmd) == [1]
    node.close()

    ctl = Client(broker, "cloud-controller")
    assert ctl.connect()
    try:
        assert ctl.publish(cmd, b"while-offline") == 0
        node = Client(broker, "node-1")
        mark = broker.log_mark()
        assert node.connect(clean_start=False, session_expiry=3600)
        assert node.session_present
        node.wait_message(cmd, b"while-offline")
        # Let the broker see node-1's PUBACK, so the message is not redelivered.
        broker.wait_for_log(r"Received PUBACK from node-1", since=mark)
        node.close()

        assert ctl.publish(cmd, b"before-restart") == 0
    finally:
        ctl.close()

    broker.restart()  # SIGTERM: mosquitto saves sessions and queued messages

    node = Client(broker, "node-1")
    try:
        mark = broker.log_mark()
        assert node.connect(clean_start=False, session_expiry=3600)
        assert node.session_present
        node.wait_message(cmd, b"before-restart")
        assert node.messages == [(cmd, b"before-restart")]
        broker.wait_for_log(r"Received PUBACK from node-1", since=mark)
    finally:
        node.close()

    # A crash keeps what an autosave wrote: wait_saved() makes that deterministic.
    ctl = Client(broker, "cloud-controller")
    assert ctl.connect()
    try:
        assert ctl.publish(cmd, b"before-kill") == 0
    finally:
        ctl.close()
    broker.wait_saved()
    broker.kill()
    broker.start()

    node = Client(broker, "node-1")
    try:
        assert node.connect(clean_start=False, session_expiry=3600)
        assert node.session_present
        node.wait_message(cmd, b"before-kill")
        assert node.messages == [(cmd, b"before-kill")]
    finally:
        node.close()
