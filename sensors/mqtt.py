"""The MQTT source: QoS 1 subscriptions on a broker, in a persistent session, with each message's
payload decoded into one channel value (a wildcard filter without `channel` adds a channel per
topic it matches, at run time)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import ssl
from dataclasses import dataclass

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from config.names import NAME_RE
from config.sensors import MqttSensor
from config.sensors import mqtt_topic_channel as topic_channel
from sensors.base import SourceError
from sensors.live import LiveSource

log = logging.getLogger(__name__)

# The config's `Name` pattern: what a channel name may be.
CHANNEL_NAME = NAME_RE  # a channel is named like everything else (config.names)
# A bare number as sensors write it. Stricter than float(), which also takes "1_000" and "٣".
_NUMBER = re.compile(
    r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)", re.IGNORECASE | re.ASCII
)
_SHOWN_CHARS = 40
# Most channels one source adds at run time for the topics its wildcard filters match: a
# publisher that puts an id or a timestamp in its topics must not grow every window without end.
MAX_TOPIC_CHANNELS = 256

# CONNACK reason codes after which connecting again with the same settings cannot succeed (paho
# turns the MQTT 3.1.1 return codes 2, 4 and 5 into these).
_ID_REJECTED = 133
_BAD_CREDENTIALS = 134
_NOT_AUTHORISED = 135
_SUBACK_FAILURE = 0x80


class MalformedPayload(ValueError):
    """A payload that is not what its topic was configured to carry; the message says why."""


def parse_payload(payload: bytes, field: str | None) -> float:
    """The raw value in a payload: a bare number (or `true`/`false`) when `field` is None, else
    the value at the dotted path `field` of a JSON document (object keys, and list indexes such
    as `values.0`). JSON booleans count 1/0, numeric strings count as their number; NaN and
    infinities pass through (the window builder counts them). Anything else raises
    `MalformedPayload`."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPayload(f"payload is not UTF-8 (bad byte at offset {exc.start})") from None
    if field is None:
        return _number(text, "payload")
    try:
        document = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer past Python's digit limit
        raise MalformedPayload(f"payload is not JSON ({exc})") from None
    return _json_number(_at_path(document, field), field)


def _number(text: str, what: str) -> float:
    stripped = text.strip()
    if stripped in ("true", "false"):
        return 1.0 if stripped == "true" else 0.0
    if not _NUMBER.fullmatch(stripped):
        if not stripped:
            raise MalformedPayload(f"{what} is empty")
        raise MalformedPayload(f"{what} {_shown(stripped)} is not a number")
    return float(stripped)


def _at_path(document: object, field: str) -> object:
    value = document
    walked: list[str] = []
    for key in field.split("."):
        where = f"{'.'.join(walked)!r}" if walked else "the document"
        if isinstance(value, dict):
            if key not in value:
                raise MalformedPayload(f"JSON has no field {field!r} ({where} has no {key!r})")
            value = value[key]
        elif isinstance(value, list):
            if not (key.isascii() and key.isdigit()):
                raise MalformedPayload(
                    f"JSON has no field {field!r} ({where} is a list and {key!r} is no index)"
                )
            if int(key) >= len(value):
                raise MalformedPayload(
                    f"JSON has no field {field!r} ({where} has {len(value)} items, "
                    f"no index {int(key)})"
                )
            value = value[int(key)]
        else:
            raise MalformedPayload(
                f"JSON has no field {field!r} ({where} is {_json_kind(value)}, not an object)"
            )
        walked.append(key)
    return value


def _json_number(value: object, field: str) -> float:
    if isinstance(value, bool):  # before int: bool is an int
        return 1.0 if value else 0.0
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            raise MalformedPayload(f"field {field!r} is too large for a float") from None
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        return _number(value, f"field {field!r} =")
    raise MalformedPayload(f"field {field!r} is {_json_kind(value)}, not a number")


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


@dataclass(frozen=True, slots=True)
class _Route:
    """Where the messages matching one configured topic filter go, and how to read them."""

    topic_filter: aiomqtt.Wildcard
    channel: str | None  # None: the channel named after each message's topic
    field: str | None
    scale: float
    offset: float


def _routes(cfg: MqttSensor) -> list[_Route]:
    routes = []
    for topic in cfg.topics:
        try:
            topic_filter = aiomqtt.Wildcard(topic.topic)
        except ValueError:
            raise SourceError(
                cfg.name,
                f"topic filter {topic.topic!r} is not a valid MQTT filter "
                "(+ and # must fill a whole level, and # must be the last one)",
                retryable=False,
            ) from None
        channel = topic.channel
        if channel is None and not _has_wildcards(topic.topic):
            channel = _channel_of(cfg.name, topic.topic)
        routes.append(_Route(topic_filter, channel, topic.field, topic.scale, topic.offset))
    return routes


def _has_wildcards(topic_filter: str) -> bool:
    levels = topic_filter.split("/")
    return "+" in levels or "#" in levels


def _channel_of(source: str, topic_filter: str) -> str:
    """The channel a filter without wildcards and without `channel` feeds (known when the source
    is built, so a topic that cannot be a channel name is refused then)."""
    channel = topic_channel(topic_filter)
    if not CHANNEL_NAME.fullmatch(channel):
        raise SourceError(
            source,
            f"topic {topic_filter!r} cannot be a channel name ({channel!r} is not 1-64 letters, "
            "digits, '.', '_' or '-' starting with a letter or digit); set `channel`",
            retryable=False,
        )
    return channel


def _code(code: ReasonCode | int) -> int:
    return code if isinstance(code, int) else code.value


class MqttSource(LiveSource):
    """Values from an MQTT broker: one message is one sample of the channel its topic maps to.

    The client keeps a fixed id and connects with clean_session off, so the broker holds the QoS 1
    subscriptions while the link is down and delivers what was published meanwhile when it
    returns. A message goes to the first configured topic whose filter matches its topic; a
    payload that is not what that topic carries is counted `malformed`, never fatal. A wildcard
    filter without `channel` feeds a channel named after each message's topic, added when its
    first value arrives (at most `max_topic_channels` of them; a topic past that, or one that
    cannot be a channel name, is counted `malformed` and its value dropped). Credentials
    or a client id the broker refuses, or a refused subscription, fail the source for good (a
    retry cannot fix them); every other MQTT error reconnects.
    """

    transient = (aiomqtt.MqttError,)

    def __init__(
        self,
        cfg: MqttSensor,
        *,
        appliance_id: str | None = None,
        max_topic_channels: int = MAX_TOPIC_CHANNELS,
    ) -> None:
        routes = _routes(cfg)
        super().__init__(
            cfg, list(dict.fromkeys(route.channel for route in routes if route.channel is not None))
        )
        self.cfg = cfg
        if cfg.client_id is not None:
            self.client_id = cfg.client_id
        elif appliance_id is not None:
            self.client_id = f"appliance-{appliance_id}-{cfg.name}"
        else:
            self.client_id = f"appliance-{cfg.name}"
        self._routes = routes
        self.max_topic_channels = max_topic_channels
        self._known_channels = set(self.channels)
        self._topic_channels: set[str] = set()  # the channels added at run time
        self._messages = 0
        self._malformed = 0
        self.health.extra.update(messages=0.0, malformed=0.0)

    async def _session(self) -> None:
        tls_context = await self._tls_context() if self.cfg.tls else None
        # aiomqtt's inbox stays unbounded: a QoS 1 message is acknowledged as it is queued, so a
        # drop there would lose it silently. The broker bounds what it queues for us, and this
        # loop takes each message at once.
        client = aiomqtt.Client(
            self.cfg.host,
            self.cfg.port,
            username=self.cfg.username,
            password=self.cfg.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=False,
            keepalive=math.ceil(self.cfg.keepalive),
            tls_context=tls_context,
        )
        try:
            async with client:
                await self._subscribe(client)
                self._connected()
                async for message in client.messages:
                    self._take(message)
        except MqttConnectError as exc:
            refusal = self._refusal(exc)
            if refusal is None:
                raise
            raise refusal from exc

    async def _tls_context(self) -> ssl.SSLContext:
        ca_file = self.cfg.ca_file
        try:
            # Loading a CA bundle reads files: off the event loop.
            return await asyncio.to_thread(
                ssl.create_default_context, cafile=None if ca_file is None else str(ca_file)
            )
        except OSError as exc:  # ssl.SSLError included
            what = "the system's CA certificates" if ca_file is None else f"CA bundle {ca_file}"
            raise SourceError(
                self.name, f"cannot load {what}: {exc.strerror or exc}", retryable=False
            ) from exc

    def _refusal(self, exc: MqttConnectError) -> SourceError | None:
        """The permanent error a refused connection means, or None when a retry may succeed."""
        if exc.rc is None:
            return None
        code = _code(exc.rc)
        if code in (_BAD_CREDENTIALS, _NOT_AUTHORISED):
            who = (
                f"the credentials of user {self.cfg.username!r}"
                if self.cfg.username is not None
                else "a connection without credentials (it wants a username and password)"
            )
            return SourceError(
                self.name,
                f"broker refused {who} ({exc.rc}): check `username` and `password`",
                retryable=False,
            )
        if code == _ID_REJECTED:
            return SourceError(
                self.name,
                f"broker rejected client id {self.client_id!r} ({exc.rc}): set `client_id`",
                retryable=False,
            )
        return None

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        filters = list(dict.fromkeys(route.topic_filter.value for route in self._routes))
        granted = await client.subscribe([(topic_filter, 1) for topic_filter in filters])
        codes = [_code(code) for code in granted]
        for topic_filter, code in zip(filters, codes, strict=True):
            if code >= _SUBACK_FAILURE:
                raise SourceError(
                    self.name,
                    f"broker refused the subscription to {topic_filter!r} "
                    "(does its ACL let this user read it?)",
                    retryable=False,
                )
            if code == 0:
                log.warning(
                    "source %s: broker granted only QoS 0 on %r; what is published there while "
                    "the link is down will be lost",
                    self.name,
                    topic_filter,
                )

    def _take(self, message: aiomqtt.Message) -> None:
        self._messages += 1
        self.health.extra["messages"] = float(self._messages)
        topic = message.topic
        route = next((r for r in self._routes if topic.matches(r.topic_filter)), None)
        if route is None:
            # Possible with a persistent session: the broker keeps the subscriptions of an
            # earlier configuration under the same client id.
            self._malformed_input(topic.value, "matches none of the configured topics")
            return
        channel = route.channel
        if channel is None:
            channel = topic_channel(topic.value)
            if not self._may_add(topic.value, channel):
                return
        try:
            raw = parse_payload(message.payload, route.field)
        except MalformedPayload as exc:
            self._malformed_input(topic.value, str(exc))
            return
        if channel not in self._known_channels:
            # Added only with a value to carry, so a topic that sends nothing valid adds no
            # empty row to every window.
            self._builder.add_channel(channel)
            self._known_channels.add(channel)
            self._topic_channels.add(channel)
        self._publish({channel: raw * route.scale + route.offset})

    def _may_add(self, topic: str, channel: str) -> bool:
        """Whether `channel`, named after `topic`, exists or may be added; counts it if not."""
        if channel in self._known_channels:
            return True
        if not CHANNEL_NAME.fullmatch(channel):
            self._malformed_input(
                topic,
                f"topic cannot be a channel name ({channel!r} is not 1-64 letters, digits, "
                "'.', '_' or '-' starting with a letter or digit); set `channel` on its filter",
            )
            return False
        if len(self._topic_channels) >= self.max_topic_channels:
            self._count_malformed(
                f"too many channels: topic {topic!r} would add one past the "
                f"{self.max_topic_channels} made from topics; its value is dropped"
            )
            return False
        return True

    def _malformed_input(self, topic: str, why: str) -> None:
        self._count_malformed(f"{topic}: {why}")

    def _count_malformed(self, detail: str) -> None:
        self._malformed += 1
        self.health.extra["malformed"] = float(self._malformed)
        self.quality.add("malformed", detail)
