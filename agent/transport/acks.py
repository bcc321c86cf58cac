"""PUBACK reason codes for aiomqtt publishes, shared by the agent and the controller.

aiomqtt resolves a QoS 1 publish when paho says "published", whatever the
broker's reason code: an ACL denial (135) looks like success. This wraps
paho's ``on_publish`` to see the code of each message id, including the ones
that arrive before ``publish`` has registered its future.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from agent.errors import TransientError
from agent.timeouts import within


class PublishAcks:
    def __init__(self) -> None:
        self._acks: dict[int, asyncio.Future[int]] = {}
        self._early: dict[int, int] = {}

    def watch(self, client: aiomqtt.Client) -> None:
        inner: paho.Client = client._client  # private: the aiomqtt#345 workaround
        original = inner.on_publish

        def on_publish(c: paho.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
            code = int(getattr(rc, "value", rc or 0))
            fut = self._acks.get(mid)
            if fut is not None and not fut.done():
                fut.set_result(code)
            else:
                self._early[mid] = code
            if original is not None:
                original(c, userdata, mid, rc, props)  # type: ignore[call-arg]

        inner.on_publish = on_publish

    def fail_all(self) -> None:
        """The connection is gone: every publish still waiting fails, to be retried."""
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(TransientError("connection lost before PUBACK"))
        self._early.clear()

    async def publish(self, client: aiomqtt.Client, topic: str, payload: bytes, *,
                      retain: bool, timeout: float) -> int:
        """Publish at QoS 1 and return the broker's PUBACK reason code."""
        info = client._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise TransientError(f"publish failed: {paho.error_string(info.rc)}")
        if info.mid in self._early:
            return self._early.pop(info.mid)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = fut
        try:
            return await within(fut, timeout)
        except asyncio.TimeoutError:
            raise TransientError("no PUBACK from the broker in time") from None
        finally:
            self._acks.pop(info.mid, None)
