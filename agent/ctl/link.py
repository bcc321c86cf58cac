"""The controller's MQTT link: commands out, reports and presence in.

It is the agent transport's counterpart and keeps its rules
(``agent.transport.mqtt``): MQTT v5 over mutual TLS, QoS 1, a persistent
session (``clean_start=False``) so reports sent while the controller is down
wait at the broker, manual acks sent only after the report is committed to the
job store, PUBACK reason codes checked on every command, and a new client on
every connection. Reports come in through a plain subscription, or a shared
one (``$share/<group>/…/status``) where ``controller.shared_group`` is set for
replicas on a broker that checks SUBSCRIBE (docs/scaling.md); presence is
retained and read whole.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.ctl.settings import CtlSettings
from agent.ctl.store import Store, now
from agent.errors import AgentError, TransientError
from agent.faults import fault_point
from agent.tls import check_tls_files, client_context
from agent.transport.acks import PublishAcks

log = structlog.get_logger("agent.ctl")
PUBACK_TIMEOUT_SECONDS = 30.0
MAX_MESSAGE_BYTES = 1 << 20
# Reports the broker may have in flight to us before we ack one. A controller
# reads thousands of nodes: a window, unlike the agent's 1, but a bounded one.
RECEIVE_MAXIMUM = 64
BATCH = 256  # messages committed in one transaction
LEAVES = ("status", "presence")


class CommandRefused(AgentError):
    """The broker refused a command (PUBACK reason code >= 128, e.g. the ACL)."""


class BrokerUnreachable(TransientError):
    """No first connection within ``controller.connect_timeout_seconds`` (exit 5)."""

    exit_code = 5


class Link:
    def __init__(self, settings: CtlSettings, store: Store,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.store = store
        self.on_change = on_change
        self.connected = asyncio.Event()
        self.settled = asyncio.Event()  # the retained presence has arrived
        self.presence_topic = settings.wildcard("presence")
        status = settings.wildcard("status")
        group = settings.shared_group
        self.status_filter = f"$share/{group}/{status}" if group else status
        self._client: aiomqtt.Client | None = None
        self._acks = PublishAcks()
        self._last_presence = 0.0
        self.connections = 0
        self.last_error = ""

    async def run(self) -> None:
        m = self.settings.mqtt
        check_tls_files(m.tls, "mqtt")
        backoff = m.reconnect_min_seconds
        while True:
            try:
                ctx = await asyncio.to_thread(client_context, m.tls)
                async with self._new_client(ctx) as client:
                    self._client = client
                    self.connections += 1
                    self.connected.set()
                    backoff = m.reconnect_min_seconds
                    log.info("connected to broker", host=m.host, port=m.port)
                    self._last_presence = time.monotonic()
                    await client.subscribe(self.status_filter, qos=1)
                    await client.subscribe(self.presence_topic, qos=1)
                    settle = asyncio.ensure_future(self._settle())
                    try:
                        await self._read(client)
                    finally:
                        settle.cancel()
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
                log.warning("broker connection lost", error=str(exc), retry_in_s=backoff)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.last_error = f"TLS files: {exc}"
                log.error("cannot load TLS files", error=str(exc), retry_in_s=backoff)
            finally:
                self._client = None
                self.connected.clear()
                self._acks.fail_all()
            await asyncio.sleep(random.uniform(backoff / 2, backoff))  # noqa: S311
            backoff = min(backoff * 2, m.reconnect_max_seconds)

    def _new_client(self, ctx: ssl.SSLContext) -> aiomqtt.Client:
        m = self.settings.mqtt
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = m.session_expiry_seconds
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        client = aiomqtt.Client(
            m.host, m.port, identifier=self.settings.client_id,
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props,
            tls_context=ctx, keepalive=m.keepalive_seconds, timeout=10,
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        client._client.manual_ack_set(True)  # private: the aiomqtt#345 workaround
        self._acks.watch(client)
        return client

    async def _settle(self) -> None:
        quiet = self.settings.presence_settle_seconds
        # A quiet period, not an event: nothing marks the end of the retained set.
        while time.monotonic() - self._last_presence < quiet:  # noqa: ASYNC110
            await asyncio.sleep(quiet / 4)
        self.settled.set()
        self.on_change()

    async def _read(self, client: aiomqtt.Client) -> None:
        messages = client.messages
        async for first in messages:
            # What already waits in the queue joins this one: one commit (one fsync)
            # for a burst, then the acks. On the loop, as the agent's journal does.
            batch = [first]
            while len(messages) and len(batch) < BATCH:
                batch.append(await anext(messages))
            if self._take(batch):
                fault_point("ctl:taken")  # committed, not acked: the broker sends them again
            if client is self._client:
                for message in batch:
                    if message.qos > 0:
                        client._client.ack(message.mid, message.qos)
            self.on_change()
        raise aiomqtt.MqttError("message stream ended")

    def _take(self, batch: list[aiomqtt.Message]) -> bool:
        """Commit messages to the store before their acks; a bad one is logged and dropped.
        A failed commit raises: nothing is acked, and the broker delivers them again."""
        items: list[tuple[str, str, dict[str, Any]]] = []
        for message in batch:
            topic = str(message.topic)
            raw = message.payload if isinstance(message.payload, bytes) else \
                str(message.payload).encode()
            leaf = topic.rsplit("/", 1)[-1]
            node = self.settings.node_of(topic, leaf) if leaf in LEAVES else None
            if node is None or len(raw) > MAX_MESSAGE_BYTES:
                log.warning("message ignored", topic=topic, bytes=len(raw))
                continue
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                body = None
            if not isinstance(body, dict):
                log.warning("malformed message ignored", topic=topic)
                continue
            items.append((leaf, node, body))
            if leaf == "presence":
                self._last_presence = time.monotonic()
        if items:
            self.store.record_batch(items, now())
        return any(leaf == "status" for leaf, _, _ in items)  # reports were committed

    async def pump(self) -> None:
        """Send the commands other processes queued in the store (``confirm`` while
        this process holds the broker link: one identity, one connection)."""
        while True:
            await asyncio.sleep(self.settings.tick_seconds)
            for ident, node, body in self.store.unsent():
                try:
                    await self.publish(node, body)
                except TransientError:
                    break  # not connected: the next round tries again
                except CommandRefused as exc:
                    self.store.mark_sent(ident, now(), exc.reason)
                else:
                    self.store.mark_sent(ident, now())

    async def publish(self, node: str, body: dict[str, Any]) -> None:
        """Send one command; raises TransientError (retry) or CommandRefused."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise TransientError("not connected to the broker")
        topic = self.settings.topic(node, "cmd")
        payload = json.dumps(body, sort_keys=True).encode()
        code = await self._acks.publish(client, topic, payload, retain=False,
                                        timeout=PUBACK_TIMEOUT_SECONDS)
        if code >= 0x80:
            raise CommandRefused(f"broker refused the command to {node} (reason code {code}): "
                                 "check the controller's ACL")
