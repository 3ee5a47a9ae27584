"""Sensor sources: simulated, CSV replay and the live MQTT, Modbus, OPC UA and NMEA ones."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from config.analysis import AnomalySettings, DriftSettings, FeatureSettings, Limit
from config.base import Duration, Name, Problem, Strict, raise_problems
from config.checks import (
    Channels,
    analysis_problems,
    channel_problems,
    features_of,
    repeated,
)
from config.words import OPC_URL_PATTERN

# Every channel sensors/nmea.py's decoders produce, except the dynamic `xdr.<name>` ones (the
# decoders use this list): a limit on an NMEA channel is checked against it.
NMEA_CHANNELS: tuple[str, ...] = (
    "lat",
    "lon",
    "fix_quality",
    "satellites",
    "hdop",
    "altitude_m",
    "sog_kn",
    "sog_kmh",
    "cog_deg",
    "heading_deg",
    "wind_angle_rel",
    "wind_speed_rel",
    "wind_angle_true",
    "wind_speed_true",
    "water_temp_c",
)
"""Every channel an NMEA source's decoders produce, except the `xdr.<name>` ones."""
XDR_PREFIX = "xdr."
_NOT_CHANNEL_CHAR = re.compile(r"[^A-Za-z0-9._-]")


def xdr_channel(transducer: str) -> str:
    """The channel of an XDR transducer name, made to fit the channel-name pattern."""
    return XDR_PREFIX + _NOT_CHANNEL_CHAR.sub("_", transducer)[: 64 - len(XDR_PREFIX)]


def mqtt_topic_channel(topic: str) -> str:
    """The channel of a topic when its filter has no `channel`: / becomes `.`, less a
    `$share/<group>/` prefix (messages arrive on the topic after it)."""
    levels = topic.split("/")
    if levels[0] == "$share":
        levels = levels[2:]
    return ".".join(levels)


class SensorCommon(Strict):
    name: Name = Field(description="Source name, stamped on its records.")
    window: Duration = Field(
        default=1.0, gt=0, description="Length of the window summarised into one record."
    )
    sample_raw_every: int = Field(
        default=0,
        ge=0,
        description="Keep the raw samples of one window in N as a `sample` payload (0: never).",
    )
    limits: list[Limit] = Field(
        default_factory=list,
        description="Feature limits; crossing one journals an alert (or event) record, and "
        "returning inside journals a clear record.",
    )
    features: FeatureSettings = Field(
        default_factory=FeatureSettings, description="Which window features are computed."
    )
    anomaly: AnomalySettings | None = Field(
        default=None, description="Anomaly detection on the window features; null: off."
    )
    drift: DriftSettings = Field(
        default_factory=DriftSettings,
        description="Drift checks of the feature means and anomaly scores against a reference.",
    )

    def known_channels(self) -> Channels:
        """The channels this source's windows will carry, as far as the config fixes them."""
        return Channels(unknown="this kind of source names its channels when it runs")

    def known_sample_rate(self) -> float | None:
        """Samples a second when they are regular (only a simulated source's are)."""
        return None

    def problems(self) -> list[Problem]:
        """What in this source names a channel or feature it will not have (paths relative to
        the source). Subclasses add their own checks, so all are reported together."""
        kind = str(getattr(self, "type", "sensor"))
        features = features_of(self.features, self.known_sample_rate(), kind)
        return analysis_problems(self.known_channels(), features, self.limits, self.anomaly)

    @model_validator(mode="after")
    def _names_fit_the_source(self) -> SensorCommon:
        raise_problems(self.problems())
        return self


class SimulatedChannel(Strict):
    name: Name = Field(description="Channel name.")
    signal: Literal["vibration", "temperature"] = Field(
        description="vibration: shaft harmonics plus noise; temperature: a slow level plus noise."
    )
    base: float = Field(
        default=0.0, description="Offset of the signal (for temperature, the mean in °C)."
    )
    amplitude: float = Field(
        default=1.0, ge=0, description="Peak of the shaft harmonic (vibration) or slow swing."
    )
    frequency: float = Field(
        default=25.0, gt=0, description="Shaft rotation frequency in Hz (vibration)."
    )
    noise: float = Field(default=0.05, ge=0, description="Standard deviation of Gaussian noise.")


class Fault(Strict):
    kind: Literal["imbalance", "bearing", "drift", "stuck", "dropout"] = Field(
        description="imbalance: a larger 1x harmonic; bearing: periodic impulses; drift: a slow "
        "ramp; stuck: the value freezes; dropout: samples go missing (NaN)."
    )
    channel: str = Field(description="Channel the fault is injected into.")
    start: Duration = Field(default=0.0, ge=0, description="Signal time after which it begins.")
    duration: Duration | None = Field(
        default=None, gt=0, description="How long it lasts; null means to the end."
    )
    magnitude: float = Field(
        default=1.0,
        ge=0,
        description="Strength: extra 1x amplitude (imbalance), impulse peak (bearing), units "
        "per minute (drift), share of samples lost (dropout, 0..1); ignored by stuck.",
    )


class SimulatedSensor(SensorCommon):
    type: Literal["simulated"] = Field(description="A simulated machine with injectable faults.")
    sample_rate: float = Field(
        default=1000.0, gt=0, le=200_000, description="Samples per second on each channel."
    )
    pace: Literal["realtime", "fast"] = Field(
        default="realtime",
        description="realtime: one window per window length of wall time; fast: no waiting.",
    )
    duration: Duration | None = Field(
        default=None,
        gt=0,
        description="Signal time after which the source ends (the last window is whole, so "
        "it may run up to one window past it); null runs forever. `appliance replay` needs it.",
    )
    seed: int | None = Field(default=None, description="Random seed, for repeatable signals.")
    channels: list[SimulatedChannel] = Field(min_length=1, description="The simulated channels.")
    faults: list[Fault] = Field(default_factory=list, description="Faults to inject.")

    def known_channels(self) -> Channels:
        return Channels(names=tuple(channel.name for channel in self.channels))

    def known_sample_rate(self) -> float | None:
        return self.sample_rate

    def problems(self) -> list[Problem]:
        channels = self.known_channels()
        return [
            *repeated(
                ((("channels", i, "name"), c.name) for i, c in enumerate(self.channels)),
                "channels",
            ),
            *channel_problems(
                channels,
                (
                    (("faults", i, "channel"), fault.channel, f"fault {fault.kind!r}")
                    for i, fault in enumerate(self.faults)
                ),
            ),
            *super().problems(),
        ]


class CsvSensor(SensorCommon):
    type: Literal["csv"] = Field(description="Replay of a CSV file of timestamped readings.")
    path: Path = Field(description="The CSV file; its first line is the header.")
    delimiter: str = Field(
        default=",", min_length=1, max_length=1, description="Field delimiter, one character."
    )
    timestamp_column: str = Field(
        default="timestamp", description="Header name of the timestamp column."
    )
    timestamp_format: Literal["iso8601", "epoch_s", "epoch_ms"] = Field(
        default="iso8601", description="How timestamps are written."
    )
    columns: list[str] | None = Field(
        default=None, description="Columns to read as channels; null means all but the timestamp."
    )
    pace: Literal["original", "fast"] = Field(
        default="fast",
        description="original: replay at the pace of the timestamps; fast: as fast as possible.",
    )
    sample_rate: float | None = Field(
        default=None,
        gt=0,
        description="Samples a second when the rows are regularly spaced (a recorded "
        "accelerometer): the windows then get vibration features (`features.kind` auto at "
        "100 Hz or more). Null: the rows' own timestamps, slow features.",
    )

    def known_sample_rate(self) -> float | None:
        return self.sample_rate

    def known_channels(self) -> Channels:
        if self.columns is not None:
            return Channels(names=tuple(self.columns))
        return Channels(unknown="a csv source's channels are its file's columns")


class LiveSensorCommon(SensorCommon):
    """What every networked or serial source shares: value checks and reconnecting."""

    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Plausible [low, high] per channel; a value outside is a data-quality "
        "record (`out_of_range`) and is left out of the window.",
    )
    stuck_after: int = Field(
        default=0,
        ge=0,
        description="A channel reading the same value this many times in a row is reported "
        "`stuck` (0: never).",
    )
    gap_after: Duration | None = Field(
        default=None,
        gt=0,
        description="No value from the source for this long is reported as a `gap` when "
        "values return; null: never.",
    )
    reconnect_max: Duration = Field(
        default=30.0, gt=0, description="Longest wait between reconnect attempts (jittered)."
    )

    def problems(self) -> list[Problem]:
        channels = self.known_channels()
        return [
            *(
                (("ranges", channel), f"range of {channel!r} must be [low, high] with low < high")
                for channel, (low, high) in self.ranges.items()
                if not low < high
            ),
            *channel_problems(
                channels, ((("ranges", channel), channel, "range") for channel in self.ranges)
            ),
            *super().problems(),
        ]


class MqttTopic(Strict):
    topic: str = Field(
        min_length=1, description="Topic filter to subscribe to; MQTT wildcards + and # allowed."
    )
    channel: Name | None = Field(
        default=None,
        description="Channel the values go to; null: the message's topic with / turned into "
        "`.` (so one wildcard filter feeds many channels).",
    )
    field: str | None = Field(
        default=None,
        description="Dotted path of the value in a JSON payload (e.g. `data.temp`); null: the "
        "payload is a bare number.",
    )
    scale: float = Field(default=1.0, description="Value = raw * scale + offset.")
    offset: float = Field(default=0.0, description="Value = raw * scale + offset.")


class MqttSensor(LiveSensorCommon):
    type: Literal["mqtt"] = Field(description="Values from an MQTT broker (QoS 1).")
    host: str = Field(min_length=1, description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port.")
    username: str | None = Field(default=None, description="User name, if the broker wants one.")
    password: str | None = Field(
        default=None, description="Password; write `${file:/run/secrets/...}` to keep it out."
    )
    tls: bool = Field(default=False, description="Connect with TLS.")
    ca_file: Path | None = Field(
        default=None, description="CA bundle for the broker's certificate; null: the system's."
    )
    client_id: str | None = Field(
        default=None,
        description="MQTT client id; null: `appliance-{id}-{name}`. A fixed id keeps the QoS 1 "
        "session, so messages sent while the link was down are delivered on reconnect.",
    )
    keepalive: Duration = Field(default=30.0, ge=5, description="MQTT keepalive interval.")
    topics: list[MqttTopic] = Field(min_length=1, description="Subscriptions and their channels.")

    def known_channels(self) -> Channels:
        names: list[str] = []
        patterns: list[tuple[str, re.Pattern[str]]] = []
        for topic in self.topics:
            levels = mqtt_topic_channel(topic.topic).split(".")
            if topic.channel is not None:
                names.append(topic.channel)
            elif "+" not in levels and "#" not in levels:
                names.append(".".join(levels))
            else:
                # A level may itself hold dots, so `+` matches any text; `#` also matches none.
                fixed = [level for level in levels if level != "#"]
                regex = r"\.".join(".+" if level == "+" else re.escape(level) for level in fixed)
                if "#" in levels:
                    regex = rf"{regex}(\..+)?" if fixed else ".+"
                shown = ".".join("*" if level in ("+", "#") else level for level in levels)
                patterns.append((f"{shown} (from {topic.topic})", re.compile(regex)))
        return Channels(names=tuple(dict.fromkeys(names)), patterns=tuple(patterns))

    def problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.password is not None and self.username is None:
            problems.append((("password",), "`password` is set but `username` is not"))
        if self.ca_file is not None and not self.tls:
            problems.append((("ca_file",), "`ca_file` is set but `tls` is false"))
        return [*problems, *super().problems()]


class ModbusRegister(Strict):
    channel: Name = Field(description="Channel the value goes to.")
    address: int = Field(ge=0, le=65535, description="First register (0-based).")
    table: Literal["holding", "input"] = Field(
        default="holding", description="Holding registers (function 3) or input registers (4)."
    )
    type: Literal["int16", "uint16", "int32", "uint32", "float32"] = Field(
        default="uint16", description="How the register(s) are read; 32-bit types use two."
    )
    byte_order: Literal["big", "little"] = Field(
        default="big", description="Byte order within a register (Modbus is big-endian)."
    )
    word_order: Literal["big", "little"] = Field(
        default="big", description="32-bit types: which register holds the high word first."
    )
    scale: float = Field(default=1.0, description="Value = raw * scale + offset.")
    offset: float = Field(default=0.0, description="Value = raw * scale + offset.")


class ModbusSensor(LiveSensorCommon):
    type: Literal["modbus"] = Field(description="Registers polled from a Modbus TCP device.")
    host: str = Field(min_length=1, description="Device host name or address.")
    port: int = Field(default=502, ge=1, le=65535, description="Modbus TCP port.")
    unit: int = Field(default=1, ge=0, le=255, description="Unit (slave) id.")
    poll: Duration = Field(default=1.0, gt=0, description="Time between polls.")
    timeout: Duration = Field(default=3.0, gt=0, description="Give up on one request after it.")
    registers: list[ModbusRegister] = Field(min_length=1, description="What to read.")

    def known_channels(self) -> Channels:
        return Channels(names=tuple(dict.fromkeys(r.channel for r in self.registers)))

    def problems(self) -> list[Problem]:
        registers = list(enumerate(self.registers))
        first: dict[str, int] = {}
        for i, register in registers:
            first.setdefault(register.channel, i)
        return [
            *(
                (
                    ("registers", i, "channel"),
                    f"channel {r.channel!r} is configured twice (also registers[{first[r.channel]}])",
                )
                for i, r in registers
                if first[r.channel] != i
            ),
            *(
                (
                    ("registers", i, "address"),
                    f"{r.channel} ({r.type}) at {r.address} runs past the last register "
                    "address 65535",
                )
                for i, r in registers
                if r.type in ("int32", "uint32", "float32") and r.address > 65534
            ),
            *super().problems(),
        ]


class OpcUaNode(Strict):
    node_id: str = Field(min_length=1, description="Node id, e.g. `ns=2;s=Gearbox.Temp`.")
    channel: Name = Field(description="Channel the value goes to.")
    scale: float = Field(default=1.0, description="Value = raw * scale + offset.")
    offset: float = Field(default=0.0, description="Value = raw * scale + offset.")


class OpcUaSensor(LiveSensorCommon):
    type: Literal["opcua"] = Field(description="Subscriptions to an OPC UA server's nodes.")
    url: str = Field(pattern=OPC_URL_PATTERN, description="Endpoint, opc.tcp://host:port/path.")
    nodes: list[OpcUaNode] = Field(min_length=1, description="Nodes to subscribe to.")
    publishing_interval: Duration = Field(
        default=1.0, gt=0, description="How often the server sends data changes."
    )
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = Field(
        default="None", description="Message security mode."
    )
    security_policy: Literal["Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"] = Field(
        default="Basic256Sha256", description="Security policy when the mode is not None."
    )
    certificate: Path | None = Field(
        default=None, description="Client certificate (DER or PEM) for Sign/SignAndEncrypt."
    )
    private_key: Path | None = Field(
        default=None, description="Client private key (PEM) for Sign/SignAndEncrypt."
    )
    server_certificate: Path | None = Field(
        default=None, description="The server's certificate, to trust it (Sign/SignAndEncrypt)."
    )
    username: str | None = Field(default=None, description="User name, if the server wants one.")
    password: str | None = Field(
        default=None, description="Password; write `${file:/run/secrets/...}` to keep it out."
    )
    timeout: Duration = Field(default=5.0, gt=0, description="Give up on one request after it.")

    def known_channels(self) -> Channels:
        return Channels(names=tuple(dict.fromkeys(node.channel for node in self.nodes)))

    def problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.security_mode != "None" and (self.certificate is None or self.private_key is None):
            problems.append(
                (
                    ("security_mode",),
                    f"security_mode {self.security_mode} needs certificate and private_key",
                )
            )
        return [*problems, *super().problems()]


class NmeaSensor(LiveSensorCommon):
    type: Literal["nmea"] = Field(
        description="NMEA 0183 sentences from serial, UDP or TCP (GGA, RMC, VTG, HDT, MWV, MTW, XDR)."
    )
    transport: Literal["serial", "udp", "tcp"] = Field(description="Where the sentences come from.")
    device: str | None = Field(default=None, description="Serial: the device, e.g. /dev/ttyUSB0.")
    baudrate: int = Field(default=4800, gt=0, description="Serial: line speed (NMEA 0183: 4800).")
    host: str = Field(
        default="0.0.0.0",
        description="UDP: address to listen on; TCP: the server to connect to.",
    )
    port: int | None = Field(
        default=None, ge=1, le=65535, description="UDP: port to listen on; TCP: port to connect to."
    )
    talkers: list[str] = Field(
        default_factory=list,
        description="Talker ids to accept (e.g. GP, II); empty: all.",
    )
    position: bool = Field(
        default=True,
        description="Stamp the last known position (GGA/RMC) on every record the appliance writes.",
    )
    xdr: list[str] = Field(
        default_factory=list,
        description="XDR transducer names to keep as channels `xdr.<name>` (characters outside "
        "[A-Za-z0-9._-] become _); values of other transducers are counted and dropped. Empty: "
        "every transducer seen, up to 64.",
    )

    def known_channels(self) -> Channels:
        if self.xdr:
            xdr = tuple(dict.fromkeys(xdr_channel(name) for name in self.xdr))
            return Channels(names=NMEA_CHANNELS + xdr)
        return Channels(
            names=NMEA_CHANNELS,
            patterns=((f"{XDR_PREFIX}<transducer>", re.compile(re.escape(XDR_PREFIX) + ".+")),),
        )

    def problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.transport == "serial" and not self.device:
            problems.append((("transport",), "transport serial needs `device`"))
        if self.transport in ("udp", "tcp") and self.port is None:
            problems.append((("transport",), f"transport {self.transport} needs `port`"))
        return [*problems, *super().problems()]


Sensor = Annotated[
    SimulatedSensor | CsvSensor | MqttSensor | ModbusSensor | OpcUaSensor | NmeaSensor,
    Field(discriminator="type"),
]
