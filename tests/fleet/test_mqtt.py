"""The async MQTT client against a real Mosquitto on loopback: no mocks, no sleeps to wait."""

from __future__ import annotations

import asyncio
import random
import time
import tomllib
from collections import Counter

import pytest

from fleet.broker import MosquittoBroker, write_self_signed_tls
from fleet.mqtt import ConnectError, ConnectInfo, Message, MqttClient, MqttSettings, PublishError, backoff_delay
from fleet.protocol import (
    NodeState,
    ProtocolError,
    StateDecision,
    Telemetry,
    TopicKind,
    Topics,
    encode,
    state_decision,
)
from tests.fleet.conftest import (
    MakeBroker,
    MakeClient,
    client_settings,
    next_message,
    unique_id,
    wait_until,
    within,
)
from tests.fleet.test_protocol import SAMPLES

TOPICS = Topics()


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(7)
    for failures in range(12):
        ceiling = min(60.0, 0.5 * 2**failures)
        delays = [backoff_delay(failures, 0.5, 60.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) == len(delays), "no jitter"
    assert backoff_delay(10_000, 0.5, 60.0, rng) <= 60.0


def test_settings_written_as_toml_read_back_the_same(tmp_path) -> None:
    settings = MqttSettings(host="broker.site.lan", port=8883, ca_file=tmp_path / "ca.crt", username="n1",
                            password='p"w\\x', keepalive_s=5, clean_start=True, reconnect_min_s=0.05)  # fmt: skip
    text = settings.toml()
    assert text.startswith("[mqtt]\n")
    assert MqttSettings.model_validate(tomllib.loads(text)["mqtt"]) == settings
    assert "session_expiry_s" not in text  # defaults stay out
    assert MqttSettings.model_validate(tomllib.loads(MqttSettings().toml())["mqtt"]) == MqttSettings()


def test_settings_refuse_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="reconnect_max_s"):
        MqttSettings(reconnect_min_s=5, reconnect_max_s=1)
    with pytest.raises(ValueError, match="needs a username"):
        MqttSettings.model_validate({"password": "p"})
    with pytest.raises(ValueError, match="extra"):
        MqttSettings.model_validate({"hots": "typo"})


async def test_publish_subscribe_round_trip(broker: MosquittoBroker, make_client: MakeClient) -> None:
    settings = client_settings(broker)
    subscriber = make_client(settings, unique_id("sub"))
    publisher = make_client(settings, unique_id("pub"))
    assert await subscriber.connect(5) == ConnectInfo(attempt=1, session_present=False)
    await publisher.connect(5)
    assert await subscriber.subscribe([("t/#", 1)]) == [1]
    messages = aiter(subscriber.messages())
    payload = bytes(range(256))
    await publisher.publish("t/a", payload, qos=1)
    await publisher.publish("t/b", b"zero", qos=0)
    first, second = await next_message(messages), await next_message(messages)
    assert (first.topic, first.payload, first.qos) == ("t/a", payload, 1)
    assert (second.topic, second.payload) == ("t/b", b"zero")
    # Reason 16 "No matching subscribers" in the PUBACK is a success.
    await publisher.publish("nobody/listens", b"x", qos=1)
    assert publisher.counters == {}


async def test_birth_then_will_as_death_after_an_abrupt_close(broker: MosquittoBroker, make_client: MakeClient) -> None:
    settings = client_settings(broker)
    topic = TOPICS.state("n1")
    observer = make_client(settings, unique_id("observer"))
    await observer.connect(5)
    await observer.subscribe([(TOPICS.all_nodes(TopicKind.STATE), 1)])
    states = aiter(observer.messages())

    def will(attempt: int) -> Message:
        # Sparkplug style: the will registered with connection attempt n carries bd_seq n.
        return Message(*TOPICS.outgoing(NodeState(node="n1", online=False, bd_seq=attempt, ts=time.time())))

    node: MqttClient

    async def birth(info: ConnectInfo) -> None:
        await node.publish_message(
            Message(*TOPICS.outgoing(NodeState(node="n1", online=True, bd_seq=info.attempt, ts=time.time())))
        )

    node = make_client(settings, unique_id("n1"), will=will, on_connect=birth)
    await node.connect(5)
    born = TOPICS.decode(*_raw(await next_message(states))).model
    assert isinstance(born, NodeState)
    assert (born.online, born.bd_seq) == (True, 1)
    # Retained: a controller that starts now learns at once that the node is online.
    late = make_client(settings, unique_id("late"))
    await late.connect(5)
    await late.subscribe([(topic, 1)])
    retained = await next_message(aiter(late.messages()))
    assert retained.retain
    assert TOPICS.decode(*_raw(retained)).model == born

    await node.abort()
    died = TOPICS.decode(*_raw(await next_message(states))).model
    assert isinstance(died, NodeState)
    assert (died.online, died.bd_seq) == (False, 1)
    assert state_decision(born.bd_seq, died) is StateDecision.DEATH
    # The will was published retained too: the next controller to start learns the node is offline.
    later = make_client(settings, unique_id("later"))
    await later.connect(5)
    await later.subscribe([(topic, 1)])
    assert TOPICS.decode(*_raw(await next_message(aiter(later.messages())))).model == died


async def test_clean_close_publishes_the_death_and_no_will(broker: MosquittoBroker, make_client: MakeClient) -> None:
    settings = client_settings(broker)
    topic = TOPICS.state("n1")
    observer = make_client(settings, unique_id("observer"))
    await observer.connect(5)
    await observer.subscribe([(topic, 1), ("marker", 1)])
    received = aiter(observer.messages())
    death = NodeState(node="n1", online=False, bd_seq=1, ts=time.time())
    will = Message(topic, b"the will must not be published", qos=1, retain=True)
    node = make_client(settings, unique_id("n1"), will=will)
    await node.connect(5)
    await node.close(death=Message(*TOPICS.outgoing(death)))
    assert (await next_message(received)).payload == encode(death)
    # Anything the broker did about the closed connection happened before this marker reached it.
    marker = make_client(settings, unique_id("marker"))
    await marker.connect(5)
    await marker.publish("marker", b"m")
    assert (await next_message(received)).topic == "marker"


async def test_a_late_will_is_ignored_by_the_rule(broker: MosquittoBroker, make_client: MakeClient) -> None:
    """Connection 1 hangs (no packets, socket open); connection 2 is born; the broker declares
    connection 1 dead only after 1.5 x its keepalive and publishes its will, after the new birth."""
    topic = TOPICS.state("n1")
    observer = make_client(client_settings(broker), unique_id("observer"))
    await observer.connect(5)
    await observer.subscribe([(topic, 1)])
    states = aiter(observer.messages())

    def node_client(bd_seq: int, keepalive_s: int) -> MqttClient:
        death = NodeState(node="n1", online=False, bd_seq=bd_seq, ts=time.time())
        # Two client ids: with one, the second CONNECT takes the session over and the broker publishes
        # the first will at once, before the new birth (not late).
        return make_client(
            client_settings(broker, keepalive_s=keepalive_s),
            unique_id(f"n1-boot{bd_seq}"),
            will=Message(topic, encode(death), qos=1, retain=True),
        )

    async def born(client: MqttClient, bd_seq: int) -> None:
        await client.connect(5)
        await client.publish(
            topic, encode(NodeState(node="n1", online=True, bd_seq=bd_seq, ts=time.time())), retain=True
        )

    # keepalive 1 s: the broker gives up on the silent connection after ~1.5 s.
    first = node_client(1, keepalive_s=1)
    await born(first, 1)
    await first.abort(hang=True)
    second = node_client(2, keepalive_s=30)
    await born(second, 2)

    current: int | None = None
    online = False
    decisions: list[tuple[StateDecision, int]] = []
    started = time.monotonic()
    while len(decisions) < 3:
        model = TOPICS.decode(*_raw(await next_message(states))).model
        assert isinstance(model, NodeState)
        decision = state_decision(current, model)
        decisions.append((decision, model.bd_seq))
        if decision is StateDecision.BIRTH:
            current, online = model.bd_seq, True
        elif decision is StateDecision.DEATH:
            online = False
    print(f"late will arrived {time.monotonic() - started:.2f} s after the second birth")
    assert decisions == [(StateDecision.BIRTH, 1), (StateDecision.BIRTH, 2), (StateDecision.LATE_WILL, 1)]
    assert online


async def test_queued_qos1_messages_survive_a_broker_restart(make_broker: MakeBroker, make_client: MakeClient) -> None:
    broker = make_broker()
    settings = client_settings(broker)
    subscriber_id = unique_id("controller")
    subscriber = make_client(settings, subscriber_id)
    await subscriber.connect(5)
    await subscriber.subscribe([("q/#", 1)])
    await subscriber.close()  # a clean DISCONNECT: the session (and its subscription) stays for a day

    publisher = make_client(settings, unique_id("node"))
    await publisher.connect(5)
    count = 50
    for index in range(count):
        await publisher.publish(f"q/{index}", str(index).encode(), qos=1)  # PUBACK: the broker holds it
    await publisher.close()

    await asyncio.to_thread(broker.restart)  # SIGTERM saves the database; the port stays the same

    returning = make_client(settings, subscriber_id)
    info = await returning.connect(5)
    assert info.session_present
    messages = aiter(returning.messages())
    received = [int((await next_message(messages)).payload) for _ in range(count)]
    assert received == list(range(count))


async def test_publish_while_the_broker_is_down_resolves_after_it_returns(
    make_broker: MakeBroker, make_client: MakeClient
) -> None:
    broker = make_broker()
    settings = client_settings(broker)
    subscriber = make_client(settings, unique_id("controller"))
    await subscriber.connect(5)
    await subscriber.subscribe([("down/#", 1)])
    publisher = make_client(settings, unique_id("node"))
    await publisher.connect(5)

    await asyncio.to_thread(broker.stop)
    await within(publisher.wait_disconnected(10))
    pending = asyncio.ensure_future(publisher.publish("down/x", b"queued while down", qos=1))
    await asyncio.to_thread(broker.start)
    await within(pending)  # paho kept it and sent it on reconnect; the PUBACK resolved it
    message = await next_message(aiter(subscriber.messages()))
    assert message.payload == b"queued while down"
    assert publisher.counters["disconnected"] == 1
    assert subscriber.counters["disconnected"] == 1


async def test_subscribing_while_disconnected_is_sent_on_reconnect(
    make_broker: MakeBroker, make_client: MakeClient
) -> None:
    broker = make_broker()
    settings = client_settings(broker)
    client = make_client(settings, unique_id("controller"))
    await client.connect(5)
    await asyncio.to_thread(broker.stop)
    await within(client.wait_disconnected(10))
    subscribing = asyncio.ensure_future(client.subscribe([("late/#", 1)]))
    await asyncio.to_thread(broker.start)
    assert await within(subscribing) == [1]
    publisher = make_client(settings, unique_id("node"))
    await publisher.connect(5)
    await publisher.publish("late/x", b"after")
    assert (await next_message(aiter(client.messages()))).payload == b"after"


async def test_subscriptions_are_renewed_when_the_broker_lost_the_session(
    make_broker: MakeBroker, make_client: MakeClient
) -> None:
    broker = make_broker()
    reconnected: asyncio.Queue[ConnectInfo] = asyncio.Queue()

    async def on_connect(info: ConnectInfo) -> None:
        reconnected.put_nowait(info)

    # Session expiry 0: the broker forgets the session with the connection, as after an expiry.
    client = make_client(client_settings(broker, session_expiry_s=0), unique_id("controller"), on_connect=on_connect)
    await client.connect(5)
    await client.subscribe([("renew/#", 1)])
    messages = aiter(client.messages())
    publisher = make_client(client_settings(broker), unique_id("node"))
    await publisher.connect(5)
    await publisher.publish("renew/x", b"kept", retain=True)
    assert (await next_message(messages)).payload == b"kept"
    await publisher.close()

    await asyncio.to_thread(broker.restart)
    assert (await within(reconnected.get())).attempt == 1
    info = await within(reconnected.get())
    assert not info.session_present
    # The retained message comes again only because the subscription was made again.
    again = await next_message(messages)
    assert (again.topic, again.payload, again.retain) == ("renew/x", b"kept", True)
    assert client.counters.get("subscribe_failed", 0) == 0


async def test_tls_with_password_auth(make_broker: MakeBroker, make_client: MakeClient) -> None:
    broker = make_broker(tls=True, users={"n1": "s3cret"})
    assert broker.ca_file is not None
    good = client_settings(broker, ca_file=broker.ca_file, username="n1", password="s3cret")
    client = make_client(good, unique_id("n1"))
    await client.connect(5)
    await client.subscribe([("tls/#", 1)])
    await client.publish("tls/x", b"over TLS")
    assert (await next_message(aiter(client.messages()))).payload == b"over TLS"

    wrong = client_settings(broker, ca_file=broker.ca_file, username="n1", password="guess")
    wrong_password = make_client(wrong, unique_id("n1"))
    with pytest.raises(ConnectError) as refused:
        await wrong_password.connect(5)
    assert refused.value.code == 135  # "Not authorized" under MQTT v5 (notes/infra.md)

    # Another CA does not vouch for the broker's certificate: every attempt fails, nothing connects.
    other_ca = write_self_signed_tls(broker.workdir / "other-ca").ca_file
    untrusting = make_client(
        client_settings(broker, ca_file=other_ca, username="n1", password="s3cret"), unique_id("n1")
    )
    await untrusting.start()
    await wait_until(lambda: untrusting.counters.get("connect_failed", 0) >= 2)
    assert not untrusting.connected


async def test_an_acl_denial_is_a_publish_failure(make_broker: MakeBroker, make_client: MakeClient) -> None:
    acl = "\n".join(
        [
            "user controller",
            "topic readwrite zimage/v1/#",
            # %u fills a whole topic level: each node writes only its own topics.
            "pattern write zimage/v1/nodes/%u/telemetry",
            "pattern read zimage/v1/nodes/%u/desired",
            "",
        ]
    )
    broker = make_broker(users={"n1": "p1", "controller": "pc"}, acl=acl)
    controller = make_client(client_settings(broker, username="controller", password="pc"), unique_id("controller"))
    await controller.connect(5)
    await controller.subscribe([(TOPICS.all_nodes(TopicKind.TELEMETRY), 1)])
    node = make_client(client_settings(broker, username="n1", password="p1"), "n1")
    await node.connect(5)

    own = SAMPLES[TopicKind.TELEMETRY]
    assert isinstance(own, Telemetry)
    mine = own.model_copy(update={"node": "n1"})
    await node.publish(TOPICS.telemetry("n1"), encode(mine))
    with pytest.raises(PublishError) as denied:
        await node.publish(TOPICS.telemetry("n2"), encode(mine.model_copy(update={"node": "n2"})))
    assert (denied.value.code, denied.value.reason) == (135, "Not authorized")
    assert node.counters["publish_failed"] == 1
    # Mosquitto grants a SUBSCRIBE that its ACL denies and then delivers nothing.
    assert await node.subscribe([(TOPICS.desired("n2"), 1)]) == [1]
    delivered = await next_message(aiter(controller.messages()))
    assert TOPICS.decode(*_raw(delivered)).model == mine


async def test_drops_are_counted_by_reason_on_the_wire(broker: MosquittoBroker, make_client: MakeClient) -> None:
    settings = client_settings(broker)
    controller = make_client(settings, unique_id("controller"))
    await controller.connect(5)
    await controller.subscribe([(f"{TOPICS.prefix}/#", 1)])
    node = make_client(settings, unique_id("n1"))
    await node.connect(5)
    good = SAMPLES[TopicKind.TELEMETRY]
    assert isinstance(good, Telemetry)
    sent = [
        (TOPICS.telemetry("n1"), b"{not json"),
        (TOPICS.telemetry("n2"), encode(good)),  # the payload names another node
        (TOPICS.desired(good.node), encode(good)),  # telemetry on the desired topic
        (f"{TOPICS.prefix}/nodes/n1/firmware", b"{}"),
        (TOPICS.telemetry(good.node), encode(good)),
    ]
    for topic, payload in sent:
        await node.publish(topic, payload)
    drops: Counter[str] = Counter()
    accepted = []
    messages = aiter(controller.messages())
    for _ in sent:
        try:
            accepted.append(TOPICS.decode(*_raw(await next_message(messages))).model)
        except ProtocolError as error:
            drops[error.reason] += 1
    assert drops == {"malformed": 1, "node_mismatch": 1, "schema": 1, "unknown_topic": 1}
    assert accepted == [good]


async def test_a_slow_consumer_drops_are_counted(broker: MosquittoBroker, make_client: MakeClient) -> None:
    settings = client_settings(broker)
    slow = make_client(client_settings(broker, queue_limit=2), unique_id("slow"))
    await slow.connect(5)
    await slow.subscribe([("flood/#", 1)])
    publisher = make_client(settings, unique_id("node"))
    await publisher.connect(5)
    for index in range(5):
        await publisher.publish(f"flood/{index}", b"x")
    await wait_until(lambda: slow.counters.get("queue_full", 0) == 3)
    messages = aiter(slow.messages())
    assert [(await next_message(messages)).topic for _ in range(2)] == ["flood/0", "flood/1"]


async def test_batches_hold_what_has_arrived_in_order_and_at_most_the_limit(
    broker: MosquittoBroker, make_client: MakeClient
) -> None:
    consumer = make_client(client_settings(broker), unique_id("batch"))
    await consumer.connect(5)
    await consumer.subscribe([("many/#", 1)])
    publisher = make_client(client_settings(broker), unique_id("node"))
    await publisher.connect(5)
    for index in range(7):
        await publisher.publish(f"many/{index}", b"x")
    # All seven are queued before the consumer asks: they come as 3 + 3 + 1, in arrival order.
    await wait_until(lambda: consumer.backlog == 7)
    batches = aiter(consumer.batches(3))
    sizes, topics = [], []
    while len(topics) < 7:
        batch = await within(anext(batches))
        sizes.append(len(batch))
        topics += [message.topic for message in batch]
    assert sizes == [3, 3, 1]
    assert topics == [f"many/{index}" for index in range(7)]
    with pytest.raises(ValueError, match="at least 1"):
        await anext(aiter(consumer.batches(0)))


async def test_start_keeps_retrying_until_the_broker_listens(make_broker: MakeBroker, make_client: MakeClient) -> None:
    broker = make_broker()
    settings = client_settings(broker)
    await asyncio.to_thread(broker.stop)
    client = make_client(settings, unique_id("lonely"))
    await client.start()
    await wait_until(lambda: client.counters.get("connect_failed", 0) >= 2)  # it keeps trying
    await asyncio.to_thread(broker.start)
    await within(client.wait_connected(10))


def _raw(message: Message) -> tuple[str, bytes]:
    return message.topic, message.payload


async def test_an_invalid_filter_raises_and_leaves_nothing_behind(
    broker: MosquittoBroker, make_client: MakeClient
) -> None:
    client = make_client(client_settings(broker), unique_id("controller"))
    await client.connect(5)
    with pytest.raises(ValueError, match="Invalid subscription filter"):
        await client.subscribe([("bad/#/filter", 1)])
    assert await client.subscribe([("good/#", 1)]) == [1]
