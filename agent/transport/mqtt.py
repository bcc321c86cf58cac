"""MQTT v5 over mutual TLS, with aiomqtt 2.x kept behind our Transport interface.

What the defaults of the stack would get wrong, and what we do instead:
- aiomqtt's default clean_start wipes the broker session, and the commands
  queued while the agent restarted: we connect with ``clean_start=False``
  and a session expiry of days.
- paho acks a QoS 1 message as soon as it is read, before we journal it: we
  switch to manual acks and ack only after the journal commit.
- aiomqtt ignores PUBACK reason codes, so an ACL denial looks like success:
  we wrap paho's on_publish to see them (``agent.transport.acks``).
- paho silently re-sends QoS 1 publishes when the *same* client reconnects,
  duplicating our outbox's own retries: every connection uses a new client,
  so the journal's outbox is the only source of re-sends.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import metrics
from agent.config_reader import Section
from agent.errors import AgentError, ConfigError, TransientError
from agent.systemd_notify import sd_notify
from agent.timeouts import within
from agent.tls import TlsFiles, check_tls_files, client_context
from agent.transport.acks import PublishAcks
from agent.transport.base import Inbound, Presence

if TYPE_CHECKING:
    from agent.config import Config

log = structlog.get_logger("agent.mqtt")
PUBACK_TIMEOUT_SECONDS = 30.0
# Commands the broker may send us before we ack one (MQTT v5 Receive Maximum).
# Left out, it is 65535, and mosquitto's max_inflight_messages does not bound a
# v5 client: a burst went whole into aiomqtt's unbounded queue (10,000 commands:
# RSS 34 -> 113 MiB, never returned; bench/load.py). One, not a window: mosquitto
# 2.0.11 (Debian 12) sends N more messages after every PUBACK to a window of N
# (measured; eclipse-mosquitto/mosquitto#2301), so any N > 1 is unbounded there.
# Commands are taken one at a time anyway; the cost is one round trip to the
# broker per command (on loopback, 3-7 % of burst throughput). The backlog stays
# at the broker, on its disk and under its max_queued_messages.
RECEIVE_MAXIMUM = 1


class DeliveryRefused(AgentError):
    """The broker answered a publish with a failure reason code (e.g. 135, ACL)."""


@dataclass(frozen=True)
class MqttSettings:
    """``transport.mqtt``: the broker, the topics and this node's TLS identity."""

    host: str = "127.0.0.1"
    port: int = 8883
    # {node} is replaced by node_name; a KubeEdge router rule can relay anywhere.
    topic_prefix: str = "kubeedge/nodes/{node}/upgrade"
    # The agent's own files (like its config), so paths.root does not apply.
    ca_file: str = "/etc/edge-upgrade-agent/tls/ca.crt"
    cert_file: str = "/etc/edge-upgrade-agent/tls/node.crt"
    key_file: str = "/etc/edge-upgrade-agent/tls/node.key"
    keepalive_seconds: int = 30
    session_expiry_seconds: int = 7 * 86400
    reconnect_min_seconds: float = 1.0
    reconnect_max_seconds: float = 60.0
    cert_check_interval_seconds: float = 10.0

    def topic(self, node: str, leaf: str) -> str:
        return f"{self.topic_prefix.replace('{node}', node)}/{leaf}"

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(Path(self.ca_file), Path(self.cert_file), Path(self.key_file))


def parse_mqtt(m: Section) -> MqttSettings:
    prefix = m.get("topic_prefix", str, MqttSettings.topic_prefix)
    if not prefix or prefix.startswith("/") or prefix.endswith("/") or any(
            c in prefix for c in "#+\0"):
        raise ConfigError(f"{m.key('topic_prefix')}: {prefix!r} is not a valid topic prefix "
                          "(no wildcards, no leading or trailing '/')")
    lo = m.number("reconnect_min_seconds", 1, 0.01, 3600)
    mqtt = MqttSettings(
        host=m.get("host", str, MqttSettings.host),
        port=m.integer("port", 8883, 1, 65535),
        topic_prefix=prefix,
        ca_file=m.path("ca_file", MqttSettings.ca_file),
        cert_file=m.path("cert_file", MqttSettings.cert_file),
        key_file=m.path("key_file", MqttSettings.key_file),
        keepalive_seconds=m.integer("keepalive_seconds", 30, 5, 3600),
        session_expiry_seconds=m.integer("session_expiry_seconds", 7 * 86400, 60, 2**31),
        reconnect_min_seconds=lo,
        reconnect_max_seconds=m.number("reconnect_max_seconds", 60, lo, 3600),
        cert_check_interval_seconds=m.number("cert_check_interval_seconds", 10, 0.1, 3600),
    )
    m.done()
    return mqtt


class MqttTransport:
    parse_settings = staticmethod(parse_mqtt)

    @classmethod
    def from_config(cls, config: Config, settings: MqttSettings,
                    presence: Presence) -> MqttTransport:
        return cls(config, settings, presence)

    @staticmethod
    def check_files(settings: MqttSettings) -> None:
        check_tls_files(settings.tls, "transport.mqtt")

    def __init__(self, config: Config, settings: MqttSettings, presence: Presence) -> None:
        m = settings
        self.config = config
        self.mqtt = m
        self.node = config.node_name
        self.cmd_topic = m.topic(self.node, "cmd")
        self.status_topic = m.topic(self.node, "status")
        self.presence_topic = m.topic(self.node, "presence")
        self.files = m.tls
        self.presence = presence
        self._inbox: asyncio.Queue[Inbound] = asyncio.Queue(maxsize=1000)
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._acks = PublishAcks()
        self.connections = 0  # successful connects, for logs and tests

    # -- Transport interface ------------------------------------------------

    async def commands(self) -> AsyncIterator[Inbound]:
        while True:
            yield await self._inbox.get()

    async def publish(self, report: dict[str, Any]) -> None:
        await self._publish(self.status_topic, report, retain=False)

    async def update_presence(self) -> None:
        if not self._connected.is_set():
            return
        try:
            await self._publish(self.presence_topic, await self.presence(), retain=True)
        except AgentError as exc:
            log.warning("presence update failed", error=exc.reason)

    # -- connection loop ----------------------------------------------------

    async def run(self) -> None:
        backoff = self.mqtt.reconnect_min_seconds
        fingerprint = await asyncio.to_thread(self.files.fingerprint)
        while True:
            try:
                ctx = await asyncio.to_thread(client_context, self.files)
                client = self._new_client(ctx, await self._offline_will())
                async with client:
                    self._on_connected(client)
                    backoff = self.mqtt.reconnect_min_seconds
                    await client.subscribe(self.cmd_topic, qos=1)
                    await self.update_presence()
                    try:
                        fingerprint = await self._serve(client, fingerprint)
                    except asyncio.CancelledError:
                        await self._say_offline()
                        raise
                    log.info("certificate files changed; reconnecting with the new ones")
                    continue  # a rotation is no failure: reconnect at once
            except aiomqtt.MqttError as exc:
                log.warning("broker connection lost", error=str(exc),
                            retry_in_s=round(backoff, 2))
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.error("cannot load TLS files", error=str(exc), retry_in_s=round(backoff, 2))
            finally:
                self._on_disconnected()
            sd_notify(f"STATUS=reconnecting to {self.mqtt.host}:{self.mqtt.port}")
            # Jitter, so a fleet that lost one broker does not return in lockstep:
            # a uniform wait in [backoff/2, backoff), from os.urandom rather than
            # the random module (an idle daemon's 0.15 MiB, issue 10).
            share = int.from_bytes(os.urandom(2), "big") / 65536
            await asyncio.sleep(backoff / 2 * (1 + share))
            backoff = min(backoff * 2, self.mqtt.reconnect_max_seconds)

    async def _say_offline(self) -> None:
        """A clean disconnect sends no will, so say "offline" ourselves (bounded)."""
        try:
            body = {**await self.presence(), "online": False}
            await within(self._publish(self.presence_topic, body, retain=True), 2)
        except (AgentError, asyncio.TimeoutError) as exc:
            log.info("could not publish offline presence", error=str(exc))

    def _new_client(self, ctx: ssl.SSLContext, will: aiomqtt.Will) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.mqtt.session_expiry_seconds
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        client = aiomqtt.Client(
            self.mqtt.host, self.mqtt.port, identifier=self.node,
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props,
            tls_context=ctx, will=will, keepalive=self.mqtt.keepalive_seconds, timeout=10,
            # Without it, Nagle meets delayed ACKs: ~40 ms added to every report.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        client._client.manual_ack_set(True)  # private: the aiomqtt#345 workaround
        self._acks.watch(client)
        return client

    async def _offline_will(self) -> aiomqtt.Will:
        # Only facts that stay true for the whole connection: the will is fixed
        # at CONNECT, long before an upgrade may change the version or the job.
        now = await self.presence()
        body = {"online": False, "nodeName": now.get("nodeName"), "arch": now.get("arch"),
                "agentVersion": now.get("agentVersion"), "labels": now.get("labels")}
        return aiomqtt.Will(self.presence_topic, json.dumps(body, sort_keys=True), qos=1,
                            retain=True)

    def _on_connected(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._connected.set()
        self.connections += 1
        metrics.current().broker(True)
        sd_notify(f"STATUS=connected to {self.mqtt.host}:{self.mqtt.port}")
        log.info("connected to broker", host=self.mqtt.host, port=self.mqtt.port,
                 connections=self.connections)

    def _on_disconnected(self) -> None:
        self._client = None
        self._connected.clear()
        metrics.current().broker(False)
        self._acks.fail_all()

    async def _serve(self, client: aiomqtt.Client, fingerprint: str) -> str:
        """Read commands until the connection fails (raises) or the TLS files change."""
        reader = asyncio.ensure_future(self._read(client))
        watcher = asyncio.ensure_future(self._watch_files(fingerprint))
        try:
            done, _ = await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
            return (reader if reader in done else watcher).result()
        finally:
            for task in (reader, watcher):
                task.cancel()
            await asyncio.gather(reader, watcher, return_exceptions=True)

    async def _read(self, client: aiomqtt.Client) -> str:
        async for message in client.messages:
            if not message.topic.matches(self.cmd_topic):
                continue
            payload = message.payload if isinstance(message.payload, bytes) else \
                str(message.payload).encode()
            await self._inbox.put(Inbound(f"mqtt:{message.topic}", payload,
                                          self._acker(client, message.mid, message.qos)))
        raise aiomqtt.MqttError("message stream ended")

    def _acker(self, client: aiomqtt.Client, mid: int, qos: int) -> Callable[[], Awaitable[None]]:
        async def ack() -> None:
            # After a reconnect the old mid means nothing; the broker redelivers instead.
            if qos > 0 and client is self._client:
                client._client.ack(mid, qos)
        return ack

    async def _watch_files(self, fingerprint: str) -> str:
        while True:
            await asyncio.sleep(self.mqtt.cert_check_interval_seconds)
            current = await asyncio.to_thread(self.files.fingerprint)
            if current == fingerprint:
                continue
            try:
                await asyncio.to_thread(check_tls_files, self.files, "transport.mqtt")
            except ConfigError as exc:
                # Half-written or weak new files: keep the working connection.
                log.error("new TLS files refused; keeping the current connection",
                          reason=exc.reason)
                fingerprint = current
                continue
            return current

    async def _publish(self, topic: str, body: dict[str, Any], *, retain: bool) -> None:
        client = self._client
        if client is None or not self._connected.is_set():
            raise TransientError("not connected to the broker")
        payload = json.dumps(body, sort_keys=True).encode()
        code = await self._acks.publish(client, topic, payload, retain=retain,
                                        timeout=PUBACK_TIMEOUT_SECONDS)
        if code >= 0x80:
            log.error("broker refused a publish: check the ACL for this node",
                      topic=topic, reason_code=code)
            raise DeliveryRefused(f"broker refused publish to {topic} (reason code {code})")

