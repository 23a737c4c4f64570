"""One small async MQTT client: paho-mqtt 2.x behind an asyncio interface.

Torch-free. Always MQTT v5 with VERSION2 callbacks (paho's bare constructor gives v3.1.1, where an ACL
denial is silent). paho's network thread (``loop_start``) does the I/O; whatever it learns is handed to
the event loop with ``call_soon_threadsafe``, and every public method is called on the event loop.

- Persistent session: ``clean_start=False`` and a ``SessionExpiryInterval`` on every connect, so QoS 1
  messages queued while the client was away (even across a broker restart) arrive when it returns.
  paho's default makes the first connect clean, which throws the session away (notes/infra.md).
- ``publish`` resolves on PUBACK and raises ``PublishError`` when its reason code is a failure (e.g. 135
  "Not authorized" from an ACL). Reason 16 "No matching subscribers" is a success.
- The will can change with every connection attempt (Sparkplug bd_seq): pass a function of the attempt
  number; ``ConnectInfo.attempt`` tells the ``on_connect`` hook which attempt's will is registered.
- Reconnects with jittered exponential backoff (``backoff_delay``): after a broker restart, a thousand
  nodes must not all come back in the same millisecond.
- Received messages wait in a bounded queue; what does not fit, and every other loss, is counted in
  ``counters`` by reason. Reliable delivery is end to end (the node's outbox and the controller's ack
  watermark), so a message dropped here is sent again, not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import socket
import ssl
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, ParamSpec

import paho.mqtt.client as paho
import tomli_w
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from zimage_edge.errors import ZimageEdgeError

logger = logging.getLogger(__name__)

# Why something was dropped or failed: the label values of ``counters``.
COUNTER_REASONS: Final = (
    "queue_full",  # a received message found the queue full (the consumer is too slow)
    "bad_topic",  # a received message whose topic is not UTF-8
    "loop_closed",  # paho reported something after the event loop closed
    "callback_error",  # a bug in a callback here; logged with its traceback
    "hook_error",  # the on_connect hook raised; logged with its traceback
    "publish_failed",  # a PUBACK with a failure reason code
    "publish_rejected",  # paho refused the publish (e.g. its queue is full)
    "subscribe_failed",  # a SUBACK with a failure reason code
    "connect_failed",  # the TCP/TLS connection could not be made
    "connect_refused",  # a CONNACK with a failure reason code (bad credentials, not authorized)
    "disconnected",  # an established connection was lost
    "death_not_sent",  # close() was asked to publish a death and could not
    "closed_pending",  # publishes still unacknowledged when the client closed
)


class MqttError(ZimageEdgeError):
    """An MQTT operation failed; ``reason`` names why (a reason code's name, or one of ours)."""

    def __init__(self, message: str, reason: str, code: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


class ConnectError(MqttError):
    pass


class PublishError(MqttError):
    pass


class SubscribeError(MqttError):
    pass


class MqttSettings(BaseModel):
    """How to reach the broker. Environment variables are read by the settings layer that embeds this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", description="broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="broker port (8883 is the usual TLS port)")
    ca_file: Path | None = Field(default=None, description="CA certificate to verify the broker with; enables TLS")
    username: str | None = Field(default=None, description="user name (the node id, so ACL %u patterns apply)")
    password: SecretStr | None = Field(default=None, description="password for username")
    cert_file: Path | None = Field(
        default=None, description="client certificate (PEM) for a broker that requires one; needs ca_file and key_file"
    )
    key_file: Path | None = Field(default=None, description="private key (PEM) of cert_file")
    # 30 s: a dead node is seen offline (its will) within 1.5 x keepalive = 45 s, at one PINGREQ per node
    # per 30 s, which is nothing for the broker even at thousands of nodes.
    keepalive_s: int = Field(default=30, ge=1, le=65535, description="MQTT keepalive in seconds")
    # A day outlasts an overnight site outage: QoS 1 messages queued for the node (up to the broker's
    # max_queued_messages) are delivered on return. Beyond it the retained desired/ack topics still
    # give the node the current state when it resubscribes.
    session_expiry_s: int = Field(default=86_400, ge=0, description="how long the broker keeps the session")
    # Controller replicas on a shared subscription use clean sessions: a persistent session of a dead
    # replica keeps its share of the messages queued until it returns (measured, notes/infra.md); the
    # nodes' outboxes resend whatever was not acknowledged.
    clean_start: bool = Field(default=False, description="start a fresh session on every connect (no queued messages)")
    # Backoff: half a second first (a broker restart takes ~10 ms, so the first retry usually succeeds),
    # doubling to a minute: a thousand nodes retrying against a broker that is down cost it little.
    reconnect_min_s: float = Field(default=0.5, gt=0, description="first reconnect delay ceiling")
    reconnect_max_s: float = Field(default=60.0, gt=0, description="largest reconnect delay ceiling")
    # paho's default; PUBACKs come back in under a millisecond on a LAN, so 20 in flight is not the limit.
    max_inflight: int = Field(default=20, ge=1, le=65535, description="QoS 1 messages in flight at once")
    # 10,000 messages: ten seconds of telemetry from a thousand nodes at one message per second each.
    queue_limit: int = Field(default=10_000, ge=1, description="received messages waiting for the consumer")

    def toml(self) -> str:
        """These settings as the ``[mqtt]`` section of a process's TOML config: the broker's address and
        whatever differs from the defaults. Secrets are written in clear: the file must be private."""
        return tomli_w.dumps({"mqtt": self.toml_values()})

    def toml_values(self) -> dict[str, Any]:
        """The values ``toml`` writes, for a config assembled as a whole."""
        values: dict[str, Any] = {}
        for name, spec in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None or (name not in ("host", "port") and value == spec.default):
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            values[name] = value if isinstance(value, bool | int | float | str) else str(value)
        return values

    @model_validator(mode="after")
    def _check(self) -> MqttSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        if self.password is not None and self.username is None:
            raise ValueError("a password needs a username")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("a client certificate needs TLS: set ca_file")
        return self


@dataclass(frozen=True)
class Message:
    """A message received, or one to publish (a will, a death)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class ConnectInfo:
    attempt: int  # which connection attempt succeeded (1, 2, ...): its will is the one registered
    session_present: bool  # the broker still had our session (subscriptions, queued messages)


WillFactory = Callable[[int], Message | None]
ConnectHook = Callable[[ConnectInfo], Awaitable[None]]


def backoff_delay(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before the next connection attempt after ``failures`` failed ones (0: the first retry).

    Equal jitter: half of the exponential ceiling for certain, the other half at random. Never zero (no
    busy loop against a broker that refuses at once), and clients that lost the broker together spread
    out over the second half.
    """
    ceiling = min(cap, base * 2.0 ** min(failures, 32))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails. paho (2.2) drops the socket without closing it when a
    handshake fails (an untrusted certificate), leaving the fd to the garbage collector and a
    ResourceWarning per retry."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def tls_context(ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None) -> ssl.SSLContext:
    """TLS client context trusting ``ca_file`` only: certificate and host name are verified. With
    ``cert_file`` and ``key_file`` the client shows that certificate to a broker that requires one."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.sslsocket_class = _ClosingSSLSocket
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
    return context


P = ParamSpec("P")
# A reconnect delay no test or demo outlives: an aborted client must stay down.
RECONNECT_NEVER_S = 24 * 3600


def _guarded(method: Callable[P, None]) -> Callable[P, None]:
    """A paho callback that counts and logs its own bugs: an exception escaping into paho's thread
    would stop the network loop without a word (notes/infra.md)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception:  # a paho thread must survive a bug here; counted and logged
            client = args[0]
            assert isinstance(client, MqttClient)
            client._count("callback_error")
            logger.exception("mqtt %s: error in %s", client.client_id, method.__name__)

    return wrapper


class MqttClient:
    """A persistent-session MQTT v5 client for one event loop. See the module docstring."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        will: Message | WillFactory | None = None,
        on_connect: ConnectHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self._will_factory: WillFactory | None = (lambda _attempt: will) if isinstance(will, Message) else will
        self._on_connect_hook = on_connect
        self._rng = rng or random.Random()
        self._counter_lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        # Touched by paho's thread only (and before it starts).
        self._attempt = 0
        self._failures = 0
        self._internal_mids: dict[int, list[str]] = {}
        # Shared by both threads: the subscriptions wanted (filter -> QoS) and those the broker confirmed
        # on the session it still has. A (re)connect sends what is wanted and not confirmed.
        self._subscriptions_lock = threading.Lock()
        self._subscriptions: dict[str, int] = {}
        self._confirmed: set[str] = set()
        # Event-loop side.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._first_result: asyncio.Future[ConnectInfo] | None = None
        self._pending_publish: dict[int, asyncio.Future[None]] = {}
        self._subscribe_mids: dict[int, list[str]] = {}
        self._subscribe_waiters: dict[str, list[asyncio.Future[int]]] = {}
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._hook_tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self._hung_socket: Any = None
        self._paho = self._make_paho()

    def _make_paho(self) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        client.max_inflight_messages_set(self.settings.max_inflight)
        if self.settings.username is not None:
            password = self.settings.password.get_secret_value() if self.settings.password else None
            client.username_pw_set(self.settings.username, password)
        if self.settings.ca_file is not None:
            client.tls_set_context(tls_context(self.settings.ca_file, self.settings.cert_file, self.settings.key_file))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    # -- public API (event loop) ------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """Drops and failures by reason (``COUNTER_REASONS``), since the client was made."""
        with self._counter_lock:
            return dict(self._counters)

    @property
    def backlog(self) -> int:
        """Received messages the consumer has not taken yet (at most ``queue_limit``)."""
        return self._queue.qsize()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        """Start connecting in the background (paho's thread); returns at once. Retries until ``close``."""
        if self._started:
            return
        if self._closed:
            raise MqttError(f"mqtt {self.client_id}: closed", "closed")
        self._loop = asyncio.get_running_loop()
        self._first_result = self._loop.create_future()
        self._prepare_attempt()
        self._failures = 0  # the first attempt is made at once; its delay is not a failure's
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.settings.session_expiry_s
        # clean_start=False on every connect, the first included: Mosquitto persists only such sessions.
        # (A replica's clean session: True, and a session expiry of 0.)
        self._paho.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=self.settings.clean_start,
            properties=properties,
        )
        self._paho.loop_start()
        self._started = True

    async def connect(self, timeout_s: float) -> ConnectInfo:
        """Start and wait for the first CONNACK. A refusal or no answer in time closes the client and
        raises ``ConnectError``; use ``start`` + ``wait_connected`` to keep retrying instead."""
        await self.start()
        assert self._first_result is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._first_result), timeout_s)
        except TimeoutError:
            await self.close()
            raise ConnectError(
                f"mqtt {self.client_id}: no connection to {self.settings.host}:{self.settings.port} within "
                f"{timeout_s} s",
                "timeout",
            ) from None
        except ConnectError:
            await self.close()
            raise

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until connected (``TimeoutError`` after ``timeout_s``)."""
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def wait_disconnected(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._disconnected.wait(), timeout_s)

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish. QoS 1: resolves on PUBACK (queued by paho and sent after a reconnect if the connection
        is down), ``PublishError`` on a failure reason code. QoS 0: resolves once paho has taken it."""
        loop = self._require_open()
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        # QoS 1 while disconnected: rc NO_CONN, but paho keeps the message and sends it on reconnect.
        queued_offline = info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not queued_offline:
            self._count("publish_rejected")
            raise PublishError(
                f"mqtt {self.client_id}: publish to {topic!r} refused by the client: {paho.error_string(info.rc)}",
                "rejected",
                int(info.rc),
            )
        if qos == 0:
            return
        # Registered before the next await: paho's PUBACK callback reaches us through call_soon_threadsafe,
        # so it cannot run before this line even if the broker already answered.
        future: asyncio.Future[None] = loop.create_future()
        self._pending_publish[info.mid] = future
        await future

    async def publish_message(self, message: Message) -> None:
        await self.publish(message.topic, message.payload, message.qos, message.retain)

    async def subscribe(self, topics: Sequence[tuple[str, int]]) -> list[int]:
        """Subscribe to ``(filter, qos)`` pairs and wait for the broker's SUBACK; the granted QoS of each.

        ``SubscribeError`` on a failure reason code. While disconnected the subscription is sent on the
        next connect, and it is sent again whenever the broker has lost the session.

        Mosquitto grants a SUBSCRIBE its ACL denies (and then delivers nothing): a success here does not
        prove read access (notes/infra.md).
        """
        loop = self._require_open()
        filters = [topic for topic, _ in topics]
        with self._subscriptions_lock:
            self._subscriptions.update(dict(topics))
            self._confirmed.difference_update(filters)
        waiters = [loop.create_future() for _ in filters]
        for topic, waiter in zip(filters, waiters, strict=True):
            self._subscribe_waiters.setdefault(topic, []).append(waiter)
        # paho itself knows whether it has a connection (our ``connected`` may lag it by a callback):
        # without one it sends nothing, and the next ``_on_connect`` sends what is not confirmed.
        try:
            result, mid = self._paho.subscribe(list(topics))
        except ValueError as invalid:  # a malformed filter or QoS
            self._fail_subscription(filters, SubscribeError(f"mqtt {self.client_id}: {invalid}", "invalid"))
            raise
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._subscribe_mids[mid] = filters
        elif result != MQTTErrorCode.MQTT_ERR_NO_CONN:
            error = SubscribeError(
                f"mqtt {self.client_id}: subscribe refused by the client: {paho.error_string(result)}",
                "rejected",
                int(result),
            )
            self._fail_subscription(filters, error)
        return list(await asyncio.gather(*waiters))

    async def messages(self) -> AsyncIterator[Message]:
        """Received messages in arrival order, until the client is closed."""
        while True:
            message = await self._queue.get()
            if message is None:
                self._queue.put_nowait(None)  # for any other iterator
                return
            yield message

    async def batches(self, max_messages: int) -> AsyncIterator[list[Message]]:
        """Received messages in arrival order, as lists of what has arrived by the time the consumer
        asks (at least one, at most ``max_messages``), until the client is closed. A consumer that
        stores in batches keeps up with a rate that one transaction per message cannot."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        while True:
            batch: list[Message] = []
            message = await self._queue.get()
            while message is not None:
                batch.append(message)
                if len(batch) >= max_messages or self._queue.empty():
                    break
                message = self._queue.get_nowait()
            if batch:
                yield batch
            if message is None:
                self._queue.put_nowait(None)  # for any other iterator
                return

    async def abort(self, *, hang: bool = False) -> None:
        """Drop the connection without DISCONNECT, like a crash, so the broker publishes the will.

        ``hang=True`` stops talking but keeps the TCP connection open (a frozen process, a partition):
        the broker notices only after 1.5 x keepalive, rounded up to its own check interval (measured
        with Mosquitto 2.0.11: 4.5-5 s for keepalives of 1-3 s). The client is closed either way.
        """
        self._require_open()
        self._closed = True  # the callbacks prepare no new attempt and report no disconnection
        sock = self._paho.socket()
        if not hang:
            # The crashed client stays down: paho's thread, woken by the shutdown below, would otherwise
            # reconnect after its backoff if loop_stop came later than that.
            self._paho.reconnect_delay_set(RECONNECT_NEVER_S, RECONNECT_NEVER_S)
            if isinstance(sock, socket.socket):
                # FIN without DISCONNECT: the broker publishes the will at once, before loop_stop below
                # (which can take up to 1 s: paho's thread checks for it once a second).
                with contextlib.suppress(OSError):  # already cut by the broker: nothing left to cut
                    sock.shutdown(socket.SHUT_RDWR)
        await self._stop_network()
        if sock is not None:
            if hang:
                self._hung_socket = sock  # closed by close()
            else:
                sock.close()
        self._finish("aborted")

    async def close(self, death: Message | None = None, timeout_s: float = 5.0) -> None:
        """Publish ``death`` (if given and connected), DISCONNECT (the broker drops the will), stop."""
        if self._closed:
            if self._hung_socket is not None:
                self._hung_socket.close()
                self._hung_socket = None
            return
        if not self._started:
            self._finish("closed")
            return
        if death is not None:
            await self._send_death(death, timeout_s)
        self._closed = True  # from here on the callbacks stop preparing new attempts
        self._paho.disconnect()
        await self._stop_network()
        self._finish("closed")

    # -- event-loop internals ---------------------------------------------------------------------

    async def _stop_network(self) -> None:
        # loop_stop joins paho's thread, which may sit out the rest of its 1 s select: not on the loop.
        await asyncio.to_thread(self._paho.loop_stop)
        # paho closes the socket pair that wakes its thread only in __del__, and our callbacks keep it in
        # a reference cycle until the garbage collector runs: close it now (the MQTT socket is closed by
        # paho on disconnect, or by abort()).
        self._paho._reset_sockets(sockpair_only=True)

    def _require_open(self) -> asyncio.AbstractEventLoop:
        if self._closed or self._loop is None:
            raise MqttError(f"mqtt {self.client_id}: {'closed' if self._closed else 'not started'}", "closed")
        return self._loop

    async def _send_death(self, death: Message, timeout_s: float) -> None:
        if not self.connected:
            self._count("death_not_sent")
            logger.warning(
                "mqtt %s: not connected; death on %s not sent (its will stands)", self.client_id, death.topic
            )
            return
        try:
            await asyncio.wait_for(self.publish_message(death), timeout_s)
        except (MqttError, TimeoutError) as error:
            self._count("death_not_sent")
            logger.warning("mqtt %s: death on %s not sent: %r", self.client_id, death.topic, error)

    def _finish(self, why: str) -> None:
        self._closed = True
        unacked = [future for future in self._pending_publish.values() if not future.done()]
        if unacked:
            self._count("closed_pending", len(unacked))
        futures: list[asyncio.Future[Any]] = list(self._pending_publish.values())
        futures += [waiter for group in self._subscribe_waiters.values() for waiter in group]
        for future in futures:
            if not future.done():
                future.set_exception(MqttError(f"mqtt {self.client_id}: {why} before the broker answered", why))
        self._pending_publish.clear()
        self._subscribe_waiters.clear()
        self._subscribe_mids.clear()
        if self._first_result is not None and not self._first_result.done():
            self._first_result.set_exception(ConnectError(f"mqtt {self.client_id}: {why}", why))
            self._first_result.exception()  # retrieved: nobody may be waiting for it
        for task in self._hook_tasks:
            task.cancel()
        self._connected.clear()
        self._disconnected.set()
        self._queue.put_nowait(None)

    def _count(self, reason: str, n: int = 1) -> None:
        with self._counter_lock:
            self._counters[reason] += n

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` on the event loop (from paho's thread)."""
        loop = self._loop
        if loop is None:
            self._count("loop_closed")
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            self._count("loop_closed")

    def _connected_on_loop(self, info: ConnectInfo) -> None:
        self._disconnected.clear()
        self._connected.set()
        if self._first_result is not None and not self._first_result.done():
            self._first_result.set_result(info)
        if self._on_connect_hook is not None and not self._closed:
            task = asyncio.ensure_future(self._run_hook(info))
            task.set_name(f"mqtt-on-connect-{self.client_id}-{info.attempt}")
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)

    async def _run_hook(self, info: ConnectInfo) -> None:
        assert self._on_connect_hook is not None
        try:
            await self._on_connect_hook(info)
        except asyncio.CancelledError:
            raise
        except Exception:  # a failing hook must not take the client down; counted and logged
            self._count("hook_error")
            logger.exception("mqtt %s: on_connect hook failed", self.client_id)

    def _refused_on_loop(self, error: ConnectError) -> None:
        if self._first_result is not None and not self._first_result.done():
            self._first_result.set_exception(error)
            self._first_result.exception()  # retrieved: with start() alone nobody awaits it

    def _disconnected_on_loop(self) -> None:
        self._connected.clear()
        self._disconnected.set()

    def _deliver(self, message: Message) -> None:
        if self._closed:
            return
        if self._queue.qsize() >= self.settings.queue_limit:
            self._count("queue_full")
            return
        self._queue.put_nowait(message)

    def _resolve_publish(self, mid: int, reason: ReasonCode) -> None:
        future = self._pending_publish.pop(mid, None)
        if future is None or future.done():
            return  # QoS 0 (nobody waits), or the publisher was cancelled
        if reason.is_failure:
            future.set_exception(
                PublishError(f"mqtt {self.client_id}: refused: {reason.getName()}", reason.getName(), reason.value)
            )
        else:
            future.set_result(None)

    def _resolve_subscribe(self, mid: int, filters: list[str] | None, reasons: list[ReasonCode]) -> None:
        """A SUBACK: ``filters`` as sent by ``_on_connect``, or None for one sent by ``subscribe``."""
        if filters is None:
            filters = self._subscribe_mids.pop(mid, None)
            if filters is None:
                return
        for topic, reason in zip(filters, reasons, strict=False):
            if reason.is_failure:
                error = SubscribeError(
                    f"mqtt {self.client_id}: subscription to {topic!r} refused: {reason.getName()}",
                    reason.getName(),
                    reason.value,
                )
                self._fail_subscription([topic], error)
                continue
            with self._subscriptions_lock:
                self._confirmed.add(topic)
            for waiter in self._subscribe_waiters.pop(topic, []):
                if not waiter.done():
                    waiter.set_result(reason.value)

    def _fail_subscription(self, filters: list[str], error: SubscribeError) -> None:
        # A refused subscription is not retried on every reconnect: the caller hears of it and decides.
        with self._subscriptions_lock:
            for topic in filters:
                self._subscriptions.pop(topic, None)
        for topic in filters:
            for waiter in self._subscribe_waiters.pop(topic, []):
                if not waiter.done():
                    waiter.set_exception(error)
                    waiter.exception()  # retrieved: a raising subscribe() does not await it

    # -- paho's thread ----------------------------------------------------------------------------

    def _prepare_attempt(self) -> None:
        """Before each connection attempt: its will and the delay before it."""
        self._attempt += 1
        will = self._will_factory(self._attempt) if self._will_factory is not None else None
        if will is None:
            self._paho.will_clear()
        else:
            self._paho.will_set(will.topic, will.payload, will.qos, will.retain)
        delay = backoff_delay(self._failures, self.settings.reconnect_min_s, self.settings.reconnect_max_s, self._rng)
        self._failures += 1
        # paho doubles its own delay from min to max; with min == max it waits exactly our jittered delay.
        # (Its annotation says int; it computes with floats.)
        self._paho.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    @_guarded
    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._count("connect_refused")
            logger.warning("mqtt %s: connection refused: %s", self.client_id, reason.getName())
            name = reason.getName()
            error = ConnectError(f"mqtt {self.client_id}: connection refused: {name}", name, reason.value)
            self._to_loop(self._refused_on_loop, error)
            return
        self._failures = 0
        with self._subscriptions_lock:
            if not flags.session_present:
                self._confirmed.clear()  # the broker starts from nothing: subscribe again
            wanted = [(topic, qos) for topic, qos in self._subscriptions.items() if topic not in self._confirmed]
        if wanted:
            result, mid = client.subscribe(wanted)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                # Stored before the SUBACK can arrive: it is read on this same thread.
                self._internal_mids[mid] = [topic for topic, _ in wanted]
        self._to_loop(self._connected_on_loop, ConnectInfo(self._attempt, bool(flags.session_present)))

    @_guarded
    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._count("connect_failed")
        if not self._closed:
            self._prepare_attempt()

    @_guarded
    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._closed:
            return  # our own DISCONNECT
        self._count("disconnected")
        logger.info("mqtt %s: disconnected: %s", self.client_id, reason.getName())
        self._prepare_attempt()
        self._to_loop(self._disconnected_on_loop)

    @_guarded
    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._count("bad_topic")
            return
        self._to_loop(self._deliver, Message(topic, bytes(message.payload), message.qos, bool(message.retain)))

    @_guarded
    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        if reason.is_failure:
            self._count("publish_failed")
        self._to_loop(self._resolve_publish, mid, reason)

    @_guarded
    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Properties | None
    ) -> None:
        if any(reason.is_failure for reason in reasons):
            self._count("subscribe_failed")
        self._to_loop(self._resolve_subscribe, mid, self._internal_mids.pop(mid, None), reasons)
