"""The controller side of the MQTT tests: publishes commands, collects reports."""

from __future__ import annotations

import json
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from testkit.broker import Broker


class Cloud:
    """The controller side: publishes commands, collects status and presence."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="cloud-controller",
                                  protocol=paho.MQTTv5)
        self.client.tls_set_context(broker.client_tls("cloud-controller"))
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.reconnect_delay_set(1, 2)
        self.connected = threading.Event()
        self.client.on_disconnect = lambda *_: self.connected.clear()
        # A persistent session, so reports sent while we reconnect are queued for us.
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", broker.port, keepalive=30, clean_start=False,
                            properties=props)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe("kubeedge/nodes/+/upgrade/status", qos=1)
        client.subscribe("kubeedge/nodes/+/upgrade/presence", qos=1)
        self.connected.set()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload), bool(msg.retain)))

    def send(self, payload: bytes | dict[str, Any], node: str = "node-1") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        # After a broker restart, paho refuses to publish until it has reconnected.
        assert self.connected.wait(30), "the cloud client is not connected"
        info = self.client.publish(f"kubeedge/nodes/{node}/upgrade/cmd", data, qos=1)
        info.wait_for_publish(10)

    def status(self, job: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [m for t, m, _ in self.messages
                    if t.endswith("/status") and job in (None, m.get("jobKey"))]

    def finals(self, job: str) -> list[dict[str, Any]]:
        return [m for m in self.status(job) if m.get("final")]

    def rejections(self, name: str) -> list[dict[str, Any]]:
        """Final reports of rejected messages named ``name`` (keys rejected:<name>:<hash>)."""
        return [m for m in self.status() if m.get("final")
                and str(m.get("jobKey", "")).startswith(f"rejected:{name}:")]

    def presence(self) -> list[dict[str, Any]]:
        with self.lock:
            return [m for t, m, _ in self.messages if t.endswith("/presence")]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
