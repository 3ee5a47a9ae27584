"""Pydantic models of the whole configuration: the contract of the YAML files (no I/O here)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from config.units import (
    DURATION_HELP,
    RATE_HELP,
    SIZE_HELP,
    parse_duration,
    parse_rate,
    parse_size,
    parse_window,
)

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": "string", "description": DURATION_HELP, "examples": ["30s", "5m"]}),
]
"""Seconds, written in YAML as `500ms`, `30s`, `5m`, `7d`."""

ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"type": "string", "description": SIZE_HELP, "examples": ["64MiB", "20GiB"]}),
]
"""Bytes, written in YAML as `512KiB`, `20GiB`."""

Rate = Annotated[
    float,
    BeforeValidator(parse_rate),
    WithJsonSchema({"type": "string", "description": RATE_HELP, "examples": ["256KiB/s"]}),
]
"""Bytes per second, written in YAML as `256KiB/s`."""

TimeWindow = Annotated[
    str,
    AfterValidator(lambda v: (parse_window(v), v)[1]),
    WithJsonSchema(
        {"type": "string", "pattern": r"^\d\d:\d\d-\d\d:\d\d$", "examples": ["02:00-05:00"]}
    ),
]

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
FeatureName = Literal[
    "rms",
    "peak",
    "mean",
    "min",
    "max",
    "crest",
    "kurtosis",
    "skewness",
    "centroid_hz",
    "slope",
]


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# `appliance.id` left out: the appliance makes one unique to its data directory at first start.
AUTO_APPLIANCE_ID = "auto"


class ApplianceSection(Strict):
    id: Name = Field(
        default=AUTO_APPLIANCE_ID,
        description="Identity of this appliance, stamped on every record; give every box of a "
        "fleet its own. Left out (or `auto`): made once per data directory as `appliance-` and "
        "8 random hex digits, kept in DATA_DIR/appliance-id, so two fresh installs never "
        "collide upstream.",
    )
    data_dir: Path = Field(
        description="Directory holding journal.db, payloads/ and models/. "
        "Overridden by --data-dir or APPLIANCE_DATA_DIR."
    )
    health_interval: Duration = Field(
        default=60.0, gt=0, description="How often a `health` telemetry record is journalled."
    )
    shutdown_timeout: Duration = Field(
        default=10.0,
        gt=0,
        description="Upper bound on a graceful stop (SIGTERM/SIGINT) before the daemon gives up "
        "waiting for its components; the journal is flushed either way.",
    )
    restart_budget: int = Field(
        default=5,
        ge=0,
        description="Restarts a crashing component gets within restart_window before it is "
        "marked degraded and left stopped.",
    )
    restart_window: Duration = Field(
        default=600.0, gt=0, description="Sliding window over which restart_budget is counted."
    )


class StatusSection(Strict):
    listen: str = Field(
        default="127.0.0.1:8080",
        pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}$",
        description="HOST:PORT the local status page and its API listen on; any address other "
        "than a loopback one needs `token_file`. Port 0 picks a free port.",
    )
    token_file: Path | None = Field(
        default=None,
        description="File holding the bearer token that `POST /api/sync` (and, on a non-loopback "
        "address, every page and API) requires.",
    )
    enabled: bool = Field(default=True, description="Serve the status page at all.")
    history_interval: Duration = Field(
        default=60.0,
        ge=0.1,
        le=3600,
        description="How often the page samples backlog and throughput for its 24-hour charts "
        "(kept in DATA_DIR/status-history.json; at most 1440 samples).",
    )


class StorageSection(Strict):
    disk_budget: ByteSize = Field(
        default=20 * 1024**3,
        gt=0,
        description="Most bytes the journal and payloads may use together; retention evicts "
        "beyond it.",
    )
    keep_synced: Duration = Field(
        default=7 * 86400.0,
        ge=0,
        description="Records acknowledged by every destination are deleted after this age.",
    )
    min_free: ByteSize = Field(
        default=256 * 1024**2,
        ge=0,
        description="Free space to keep on the data directory's file system; below it the "
        "appliance is under disk pressure: it evicts, sheds the lowest priorities and reports "
        "itself degraded until space returns.",
    )
    reserve: ByteSize = Field(
        default=16 * 1024**2,
        ge=0,
        description="Size of a ballast file kept in the data directory and released when the "
        "disk is really full, so eviction itself has room to run.",
    )
    check_interval: Duration = Field(
        default=10.0, gt=0, description="How often retention checks the budget and free space."
    )


class JournalSection(Strict):
    commit_records: int = Field(
        default=512, ge=1, le=100_000, description="A group commit closes at this many records."
    )
    commit_delay: Duration = Field(
        default=0.02,
        ge=0,
        le=5,
        description="...or this long after its first record, whichever comes first.",
    )
    max_pending: int = Field(
        default=20_000,
        ge=1,
        description="Bound on append calls waiting for the writer; producers wait "
        "(backpressure) when it is reached, so memory stays bounded.",
    )
    checkpoint_interval: Duration = Field(
        default=300.0, gt=0, description="How often the WAL is checkpointed and truncated."
    )
    full_check_limit: ByteSize = Field(
        default=256 * 1024**2,
        ge=0,
        description="At start a journal up to this size gets PRAGMA integrity_check; a larger "
        "one gets the faster quick_check.",
    )


class Limit(Strict):
    feature: FeatureName | Annotated[str, Field(pattern=r"^band_[0-9p]+_[0-9p]+$")] = Field(
        description="Window feature the limit watches (a band energy as `band_<low>_<high>`)."
    )
    channel: str | None = Field(
        default=None, description="Channel the limit applies to; null means every channel."
    )
    above: float | None = Field(default=None, description="Violated when the feature exceeds it.")
    below: float | None = Field(
        default=None, description="Violated when the feature falls under it."
    )
    priority: Literal["alert", "event"] = Field(
        default="alert", description="Priority of the record written when the limit is crossed."
    )

    @model_validator(mode="after")
    def _needs_a_bound(self) -> Limit:
        if self.above is None and self.below is None:
            raise ValueError("a limit needs `above`, `below` or both")
        return self


class FeatureSettings(Strict):
    kind: Literal["auto", "vibration", "slow"] = Field(
        default="auto",
        description="vibration: adds crest, kurtosis (Pearson, normal = 3), skewness, "
        "centroid_hz and band energies; slow: adds slope (units/s); both also give rms, peak, "
        "mean, min and max. auto: vibration for regularly sampled sources at 100 Hz or more, slow "
        "otherwise.",
    )
    bands: list[tuple[float, float]] = Field(
        default_factory=list,
        description="Vibration: FFT bands [low, high) in Hz whose energy is a feature, named "
        "`band_<low>_<high>` with `p` for a decimal point (e.g. band_312p5_625); empty: five "
        "octave bands up to the Nyquist frequency.",
    )

    @model_validator(mode="after")
    def _bands_are_ordered(self) -> FeatureSettings:
        for low, high in self.bands:
            if not 0 <= low < high:
                raise ValueError(f"band [{low}, {high}] must have 0 <= low < high")
        return self


class RefitSettings(Strict):
    enabled: bool = Field(
        default=False,
        description="Refit the source's baseline on the device on its recent healthy readings, "
        "validate it, try it in shadow beside the current one and watch it after activation.",
    )
    every: Duration = Field(
        default=604800.0,
        ge=0,
        description="Least age of the current baseline (since it was fitted) before a refit "
        "starts. An attempt that activated nothing is tried again a day later at the soonest "
        "(or after `every`, when shorter).",
    )
    windows: list[TimeWindow] = Field(
        default_factory=list,
        description="UTC time windows (HH:MM-HH:MM, may wrap midnight) in which a refit may "
        "start; empty means any time.",
    )
    data: Duration = Field(
        default=86400.0,
        gt=0,
        description="Span of the source's most recent readings (data time) the refit is fitted "
        "and validated on; windows with bad input or in or near an anomaly are left out.",
    )
    holdout: float = Field(
        default=0.25,
        ge=0.05,
        le=0.5,
        description="Share of those clean windows, the newest, held out of the fit to validate "
        "the new baseline on.",
    )
    max_over_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Validation: most share of the held-out windows over the new threshold.",
    )
    canary: Duration = Field(
        default=3600.0,
        gt=0,
        description="Data time the new baseline scores every window in shadow beside the "
        "current one before it is judged (and at least 100 windows).",
    )
    max_alarm_ratio: float = Field(
        default=2.0,
        ge=1,
        description="Canary: the new baseline's share of windows over its threshold may be at "
        "most this times the current one's, plus 0.01. Watch: the same limit against the share "
        "the replaced baseline had in the canary.",
    )
    watch: Duration = Field(
        default=21600.0,
        ge=0,
        description="Data time after activation in which an alarm share over the limit or a "
        "scoring error rolls back to the previous baseline by itself. 0: no watch.",
    )
    nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness added to the process that fits (one CPU thread), so inference "
        "never waits for it.",
    )


class AnomalySettings(Strict):
    method: Literal["robust_z", "ewma", "hotelling", "isolation_forest", "autoencoder"] = Field(
        description="robust_z: the largest median/MAD z-score of the features; ewma: an "
        "exponentially weighted control chart; hotelling: Hotelling's T² of the feature vector; "
        "isolation_forest, autoencoder: scikit-learn models fitted on the baseline and run as "
        "ONNX (skl2onnx). isolation_forest splits one feature at a time: it misses a broken "
        "correlation between channels (use hotelling or autoencoder) and its scores level off "
        "near the baseline's most extreme windows, so a margin of about 1.1 to 1.2 suits it."
    )
    features: list[str] = Field(
        default_factory=list,
        description="Feature vector as `channel.feature` names (e.g. `hss_axial.rms`); empty: "
        "every feature of every channel.",
    )
    baseline: Duration = Field(
        default=3600.0,
        gt=0,
        description="Healthy running fitted at the start (or after `models fit-baseline`); no "
        "anomaly is reported before it is fitted.",
    )
    min_windows: int = Field(
        default=30, ge=5, description="Fewest clean windows a baseline may be fitted on."
    )
    quantile: float = Field(
        default=0.99,
        gt=0.5,
        lt=1,
        description="The threshold is this quantile of the baseline's own scores, times `margin`.",
    )
    margin: float = Field(
        default=1.5,
        ge=1,
        description="Threshold = quantile score x margin. 1.5 suits a baseline that saw the "
        "machine's usual variation (the default hour); a short one (minutes) needs more, per "
        "method: see docs/configuration.md.",
    )
    debounce: tuple[int, int] = Field(
        default=(2, 3),
        description="[k, n]: an anomaly starts when k of the last n windows are over the threshold.",
    )
    hysteresis: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="An anomaly ends when n windows in a row score under threshold x hysteresis.",
    )
    critical: float = Field(
        default=2.0,
        ge=1,
        description="Score / threshold at which an anomaly is an `alert` rather than an `event`.",
    )
    raw_windows: tuple[int, int] = Field(
        default=(3, 3),
        description="[pre, post]: raw-sample windows kept around an anomaly as its payload.",
    )
    refit: RefitSettings = Field(
        default_factory=RefitSettings,
        description="Refitting the baseline on the device in scheduled windows.",
    )

    @model_validator(mode="after")
    def _debounce_fits(self) -> AnomalySettings:
        k, n = self.debounce
        if not 1 <= k <= n <= 100:
            raise ValueError("debounce must be [k, n] with 1 <= k <= n <= 100")
        if min(self.raw_windows) < 0 or max(self.raw_windows) > 60:
            raise ValueError("raw_windows must be [pre, post], each 0..60")
        return self


class DriftSettings(Strict):
    enabled: bool = Field(
        default=True,
        description="Compare the model's inputs and outputs with its reference distribution.",
    )
    reference: Duration = Field(
        default=3600.0,
        gt=0,
        description="Data time after a model is activated whose values become its reference, "
        "when the model brings none (kept in DATA_DIR/models/drift/MODEL@VERSION/SOURCE.json).",
    )
    window: Duration = Field(
        default=3600.0, gt=0, description="Sliding window of recent values compared with it."
    )
    check_interval: Duration = Field(
        default=300.0, gt=0, description="Data time between two comparisons."
    )
    min_count: int = Field(
        default=200,
        ge=10,
        description="Fewest values a reference, and a window, must hold to be compared.",
    )
    bins: int = Field(
        default=10,
        ge=2,
        le=50,
        description="Bins per quantity, cut at the reference's quantiles (both ends open).",
    )
    psi_start: float = Field(
        default=0.25,
        gt=0,
        description="Population stability index at or above which a quantity has drifted.",
    )
    psi_end: float = Field(
        default=0.1, gt=0, description="A drift ends at the first check below this PSI."
    )
    consecutive: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Checks in a row at or above psi_start before a drift starts.",
    )
    sampling_boost: float = Field(
        default=4.0,
        ge=1,
        le=1000,
        description="While a drift is active, the random sampling share (cameras) is multiplied "
        "by it and raw windows (sensors) are kept this many times as often; caps still hold.",
    )
    boost_duration: Duration = Field(
        default=3600.0,
        ge=0,
        description="The boost lasts from each check that still finds a drift until this much "
        "data time later.",
    )
    input_every: int = Field(
        default=5,
        ge=1,
        description="Cameras: brightness and sharpness are measured on one frame in N.",
    )

    @model_validator(mode="after")
    def _ends_below_start(self) -> DriftSettings:
        if self.psi_end > self.psi_start:
            raise ValueError("psi_end must not be above psi_start (hysteresis)")
        return self


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

    @model_validator(mode="after")
    def _faults_name_channels(self) -> SimulatedSensor:
        names = {channel.name for channel in self.channels}
        if len(names) != len(self.channels):
            raise ValueError("channel names must be unique")
        for fault in self.faults:
            if fault.channel not in names:
                raise ValueError(
                    f"fault {fault.kind!r} names channel {fault.channel!r}, "
                    f"which is not one of {sorted(names)}"
                )
        return self


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

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> LiveSensorCommon:
        for channel, (low, high) in self.ranges.items():
            if not low < high:
                raise ValueError(f"range of {channel!r} must be [low, high] with low < high")
        return self


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

    @model_validator(mode="after")
    def _credentials_and_tls(self) -> MqttSensor:
        if self.password is not None and self.username is None:
            raise ValueError("`password` is set but `username` is not")
        if self.ca_file is not None and not self.tls:
            raise ValueError("`ca_file` is set but `tls` is false")
        return self


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

    @model_validator(mode="after")
    def _registers_fit(self) -> ModbusSensor:
        seen: set[str] = set()
        for register in self.registers:
            if register.channel in seen:
                raise ValueError(f"channel {register.channel!r} is configured twice")
            seen.add(register.channel)
            if register.type in ("int32", "uint32", "float32") and register.address > 65534:
                raise ValueError(
                    f"{register.channel} ({register.type}) at {register.address} runs past the "
                    "last register address 65535"
                )
        return self


class OpcUaNode(Strict):
    node_id: str = Field(min_length=1, description="Node id, e.g. `ns=2;s=Gearbox.Temp`.")
    channel: Name = Field(description="Channel the value goes to.")
    scale: float = Field(default=1.0, description="Value = raw * scale + offset.")
    offset: float = Field(default=0.0, description="Value = raw * scale + offset.")


class OpcUaSensor(LiveSensorCommon):
    type: Literal["opcua"] = Field(description="Subscriptions to an OPC UA server's nodes.")
    url: str = Field(pattern=r"^opc\.tcp://", description="Endpoint, opc.tcp://host:port/path.")
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

    @model_validator(mode="after")
    def _security_has_keys(self) -> OpcUaSensor:
        if self.security_mode != "None" and (self.certificate is None or self.private_key is None):
            raise ValueError(
                f"security_mode {self.security_mode} needs certificate and private_key"
            )
        return self


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

    @model_validator(mode="after")
    def _transport_has_address(self) -> NmeaSensor:
        if self.transport == "serial" and not self.device:
            raise ValueError("transport serial needs `device`")
        if self.transport in ("udp", "tcp") and self.port is None:
            raise ValueError(f"transport {self.transport} needs `port`")
        return self


Sensor = Annotated[
    SimulatedSensor | CsvSensor | MqttSensor | ModbusSensor | OpcUaSensor | NmeaSensor,
    Field(discriminator="type"),
]


# ------------------------------------------------------------------------- models and cameras

BUILTIN_DETECTOR = "builtin:yolov3-tiny"


class DetectorModel(Strict):
    path: str = Field(
        default=BUILTIN_DETECTOR,
        min_length=1,
        description="`builtin:yolov3-tiny` (the default detector, converted from darknet at "
        "setup), `package:NAME` (the active version of a signed model package installed with "
        "`appliance models import` / `activate`, verified again at every load; its manifest gives "
        "the labels, thresholds and version that are not set here) or the path of an ONNX file "
        "(YOLO darknet-style heads, YOLOv5, YOLOv8/v11 or SSD-style outputs).",
    )
    version: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$",
        description="Version stamped on records as name@version; null: from the model's "
        "metadata, else the first 12 hex digits of its sha256.",
    )
    labels_file: Path | None = Field(
        default=None,
        description="Class names, one a line; null: from the model's metadata (or COCO for "
        "80-class models without any).",
    )
    layout: Literal["auto", "darknet", "yolov5", "yolov8", "ssd"] = Field(
        default="auto", description="Output layout; `auto` recognises it from the outputs."
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="onnxruntime execution providers, in order of preference.",
    )
    threads: int = Field(
        default=2, ge=1, le=64, description="Threads of one inference (intra-op parallelism)."
    )
    score_threshold: float = Field(
        default=0.35, gt=0, lt=1, description="Detections scoring below it are dropped."
    )
    nms_iou: float = Field(
        default=0.45, gt=0, le=1, description="Overlap (IoU) above which NMS keeps one box."
    )


def _looks_like_public_key(text: str) -> str:
    """The key text's shape only (PEM, or base64 of 32 bytes); the key itself is parsed where
    packages are verified."""
    stripped = text.strip()
    if stripped.startswith("-----BEGIN PUBLIC KEY-----"):
        return text
    try:
        raw = base64.b64decode(stripped, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ValueError(
            "a trusted key is a PEM public key (-----BEGIN PUBLIC KEY-----) or the base64 of an "
            "Ed25519 public key's 32 bytes, as `appliance models keygen` prints it"
        )
    return text


class CanarySettings(Strict):
    enabled: bool = Field(
        default=True,
        description="Try each staged version of a `package:NAME` detector that cameras use in "
        "shadow beside the active one, activate it by itself when it passes and watch it after; "
        "false: staged versions wait for `appliance models activate`.",
    )
    sample_every: int = Field(
        default=5,
        ge=1,
        le=10_000,
        description="The shadow model runs on every Nth frame the active model analyses.",
    )
    queue: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Sampled frames waiting for the shadow model; when full, further samples "
        "are dropped and counted (the camera's own frames never wait for the shadow).",
    )
    duration: Duration = Field(
        default=1800.0, gt=0, description="Shortest shadow run before it is judged."
    )
    min_frames: int = Field(
        default=100,
        ge=1,
        description="Sampled frames a shadow run needs before it is judged; also the runs a "
        "newly activated model makes before its watch judges its latency and error rate.",
    )
    max_duration: Duration = Field(
        default=14400.0,
        gt=0,
        description="A shadow run that has not seen `min_frames` by then is refused for too "
        "few frames.",
    )
    min_agreement: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="Least agreement with the active model (per frame: detections matched by "
        "class at IoU >= 0.5, F1, averaged) when the manifest sets none.",
    )
    max_latency_ratio: float = Field(
        default=2.0,
        gt=0,
        description="Most shadow p95 latency over the active model's when the manifest sets none.",
    )
    max_error_rate: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Most share of failed shadow runs when the manifest sets none; also the "
        "watch's limit for the activated model.",
    )
    watch: Duration = Field(
        default=3600.0,
        ge=0,
        description="How long a model activated by its canary is watched: a load error, p95 "
        "latency over budget or an error rate over the limit rolls it back by itself. 0: no "
        "watch.",
    )
    latency_budget_ratio: float | None = Field(
        default=None,
        gt=0,
        description="Watch: p95 latency above the previous model's p95 times this rolls the new "
        "model back; null: the canary's max_latency_ratio (manifest, else this section's).",
    )

    @model_validator(mode="after")
    def _max_after_min(self) -> CanarySettings:
        if self.max_duration < self.duration:
            raise ValueError("max_duration must be at least duration")
        return self


class ModelPackagesSection(Strict):
    trusted_keys: dict[Name, Annotated[str, AfterValidator(_looks_like_public_key)]] = Field(
        default_factory=dict,
        description="Ed25519 public keys whose signatures model packages may carry, by a label "
        "(or the key id `appliance models keygen` prints): PEM or base64 of the 32-byte key, "
        "or `${file:PATH}`. A package signed by any other key is refused; removing a key here "
        "also stops installed packages it signed from loading. Empty: no package is accepted.",
    )
    group: Name | None = Field(
        default=None,
        description="This appliance's group: a package addressed to `group:NAME` is accepted "
        "only where NAME matches (packages addressed to nobody in particular go anywhere).",
    )
    keep: int = Field(
        default=3,
        ge=2,
        le=100,
        description="Versions kept per package name under DATA_DIR/models/packages; older ones "
        "are pruned, but never the active one, the previous one or the newest import.",
    )
    pull_interval: Duration = Field(
        default=900.0,
        gt=0,
        description="How often model packages are looked for on destinations with `models: "
        "true` while they are reachable (also right after each drain); new ones are downloaded, "
        "verified and staged.",
    )
    canary: CanarySettings = Field(
        default_factory=CanarySettings,
        description="Shadow canary, activation and watch of staged detector versions.",
    )


class MotionSettings(Strict):
    enabled: bool = Field(
        default=True, description="Run the detector only on frames with motion (plus keepalives)."
    )
    width: int = Field(
        default=160, ge=16, le=1920, description="Width the frame is shrunk to for differencing."
    )
    pixel_threshold: int = Field(
        default=25, ge=1, le=255, description="Grey-level change that counts a pixel as moved."
    )
    min_area: float = Field(
        default=0.002,
        gt=0,
        le=1,
        description="Share of the frame that must move for the detector to run.",
    )
    keepalive: Duration = Field(
        default=10.0,
        gt=0,
        description="Run the detector at least this often anyway, so still objects stay tracked.",
    )


class TrackingSettings(Strict):
    iou_threshold: float = Field(
        default=0.3, gt=0, le=1, description="Overlap that matches a detection to a track."
    )
    max_missed: Duration = Field(
        default=2.0, gt=0, description="A track unseen for this long has ended (its event closes)."
    )
    min_hits: int = Field(
        default=2, ge=1, description="Detections before a track counts (filters one-frame noise)."
    )


def _normalised_point(value: tuple[float, float]) -> tuple[float, float]:
    if not all(0.0 <= v <= 1.0 for v in value):
        raise ValueError(
            f"polygon point {list(value)} is outside 0..1 (coordinates are normalised)"
        )
    return value


class Zone(Strict):
    name: Name = Field(description="Zone name, stamped on the records it causes.")
    polygon: list[Annotated[tuple[float, float], AfterValidator(_normalised_point)]] = Field(
        min_length=3, description="Corners as [x, y] in 0..1 of the frame's width and height."
    )
    classes: list[str] = Field(
        default_factory=list, description="Classes the zone cares about; empty: all the camera's."
    )
    priority: Literal["alert", "event"] = Field(
        default="alert", description="Priority of the record when an object enters the zone."
    )


class SnapshotSettings(Strict):
    max_width: int = Field(default=640, ge=64, le=4096, description="Snapshots are shrunk to it.")
    quality: int = Field(default=80, ge=10, le=100, description="JPEG quality to start from.")
    max_bytes: ByteSize = Field(
        default=200 * 1024,
        ge=8 * 1024,
        description="Largest snapshot; quality and size step down until it fits.",
    )


class ClipSettings(Strict):
    enabled: bool = Field(default=True, description="Keep an MP4 clip for every alert.")
    pre: Duration = Field(default=5.0, ge=0, le=60, description="Seconds before the alert.")
    post: Duration = Field(default=5.0, ge=0, le=60, description="Seconds after the alert.")
    max_width: int = Field(default=640, ge=64, le=1920, description="Clips are shrunk to it.")


class SamplingSettings(Strict):
    uncertain: tuple[float, float] | None = Field(
        default=(0.25, 0.5),
        description="Keep frames with a detection scoring in [low, high): the model was unsure. "
        "Null: off.",
    )
    classes: list[str] = Field(
        default_factory=list, description="Keep frames showing any of these classes."
    )
    random: float = Field(
        default=0.002,
        ge=0,
        le=1,
        description="Share of analysed frames kept at random, for drift checks.",
    )
    per_hour: int = Field(default=20, ge=0, description="Most samples kept per hour.")
    per_day: int = Field(default=200, ge=0, description="Most samples kept per UTC day.")
    daily_bytes: ByteSize = Field(
        default=50 * 1024 * 1024, ge=0, description="Most sample payload bytes per UTC day."
    )

    @model_validator(mode="after")
    def _band_is_ordered(self) -> SamplingSettings:
        if self.uncertain is not None and not 0 <= self.uncertain[0] < self.uncertain[1] <= 1:
            raise ValueError("uncertain must be [low, high] with 0 <= low < high <= 1")
        return self


class Camera(Strict):
    name: Name = Field(description="Camera name, stamped on its records.")
    url: str = Field(
        min_length=1,
        description="rtsp:// or http(s):// stream, a video file path, or a USB device index "
        "(digits, e.g. `0`).",
    )
    loop: bool = Field(default=False, description="Start a video file over at its end.")
    pace: Literal["realtime", "fast"] = Field(
        default="realtime",
        description="Video files: `realtime` at the file's frame rate, `fast` as fast as the "
        "pipeline takes frames (replay, benchmarks); streams are always realtime.",
    )
    fps: float = Field(
        default=5.0, gt=0, le=120, description="Most frames a second taken from the camera."
    )
    model: str = Field(default="detector", description="Key of the detector in `models`.")
    classes: list[str] = Field(
        default_factory=list, description="Classes to report; empty: every label of the model."
    )
    queue: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Frames waiting for the detector; when full the newest wins (drops counted).",
    )
    open_timeout: Duration = Field(
        default=10.0, gt=0, description="Give up opening a stream after this long (then retry)."
    )
    read_timeout: Duration = Field(
        default=10.0, gt=0, description="A stream that delivers no frame this long is reopened."
    )
    reconnect_max: Duration = Field(
        default=30.0, gt=0, description="Longest wait between reconnect attempts (jittered)."
    )
    motion: MotionSettings = Field(default_factory=MotionSettings, description="Motion gating.")
    tracking: TrackingSettings = Field(
        default_factory=TrackingSettings, description="Tracking detections into objects."
    )
    zones: list[Zone] = Field(
        default_factory=list, description="Restricted areas; entering one is an alert or event."
    )
    snapshot: SnapshotSettings = Field(
        default_factory=SnapshotSettings, description="The JPEG kept for every event."
    )
    clip: ClipSettings = Field(default_factory=ClipSettings, description="MP4 clips of alerts.")
    blur_classes: list[str] = Field(
        default_factory=list,
        description="Classes blurred in every snapshot, clip and sample (e.g. [person]).",
    )
    sampling: SamplingSettings = Field(
        default_factory=SamplingSettings, description="Frames kept for retraining."
    )
    drift: DriftSettings = Field(
        default_factory=DriftSettings,
        description="Drift checks of brightness, sharpness and detections against a reference.",
    )

    @model_validator(mode="after")
    def _unique_zone_names(self) -> Camera:
        # A zone's name is what its alerts say; two zones of one name could not be told apart.
        names = [z.name for z in self.zones]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"zone names must be unique within a camera; repeated: {repeated}")
        return self


class DestinationCommon(Strict):
    name: Name = Field(description="Destination name, used in status, logs and records.")
    bandwidth: Rate | None = Field(
        default=None, gt=0, description="Most bytes per second sent to it; null means no cap."
    )
    daily_payload_budget: ByteSize | None = Field(
        default=None,
        gt=0,
        description="Most payload bytes sent to it per UTC day; records still flow past it. "
        "Null means no budget.",
    )
    windows: list[TimeWindow] = Field(
        default_factory=list,
        description="UTC time windows (HH:MM-HH:MM, may wrap midnight) in which it may be used, "
        "for metered links; empty means any time.",
    )


class HttpDestination(DestinationCommon):
    type: Literal["http"] = Field(description="The reference receiver (`appliance receiver`).")
    url: str = Field(
        pattern=r"^https?://[^\s/]+", description="Base URL of the receiver, http:// or https://."
    )
    token_file: Path | None = Field(
        default=None, description="File holding this appliance's bearer token (one line)."
    )
    ca_file: Path | None = Field(
        default=None, description="CA bundle to verify an https receiver with; null: system CAs."
    )
    client_cert: Path | None = Field(
        default=None,
        description="Client certificate chain (PEM) presented to an https receiver that asks for "
        "one; null: none.",
    )
    client_key: Path | None = Field(
        default=None,
        description="Private key of client_cert (PEM); null: the key is in client_cert.",
    )
    timeout: Duration = Field(default=30.0, gt=0, description="Timeout of one request.")
    models: bool = Field(
        default=False,
        description="Also pull model packages addressed to this appliance or its group from the "
        "receiver, every model_packages.pull_interval and after each drain (docs/sync-protocol.md, "
        "Model packages).",
    )

    @model_validator(mode="after")
    def _tls_files_fit_the_url(self) -> HttpDestination:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        tls_files = [self.ca_file, self.client_cert]
        if self.url.startswith("http://") and any(path is not None for path in tls_files):
            raise ValueError("ca_file and client_cert are for https:// urls; this url is http://")
        return self


class DirectoryDestination(DestinationCommon):
    type: Literal["directory"] = Field(
        description="A directory such as a mounted USB disk or NAS share."
    )
    path: Path = Field(
        description="Directory the records and payloads are written under; a relative path is "
        "relative to appliance.data_dir."
    )
    require_mount: bool = Field(
        default=False,
        description="Only write when `path` is a mount point (so an unplugged USB disk never "
        "fills the root file system).",
    )


class S3Destination(DestinationCommon):
    type: Literal["s3"] = Field(
        description="An S3-compatible bucket (AWS S3, MinIO, SeaweedFS, ...)."
    )
    endpoint_url: str = Field(
        pattern=r"^https?://[^\s/]+",
        description="Endpoint of the S3 API, http:// or https:// (for AWS: "
        "https://s3.REGION.amazonaws.com).",
    )
    bucket: str = Field(
        min_length=3, max_length=63, description="Bucket the objects are written to; must exist."
    )
    prefix: str = Field(
        default="",
        description='Prepended to every object key (for example "site-a/"); empty: none.',
    )
    region: str = Field(default="us-east-1", min_length=1, description="Region to sign for.")
    access_key_file: Path = Field(description="File holding the access key id (one line).")
    secret_key_file: Path = Field(description="File holding the secret access key (one line).")
    timeout: Duration = Field(
        default=30.0, gt=0, description="Connect and read timeout of one request."
    )
    models: bool = Field(
        default=False,
        description="Also pull model packages from PREFIXmodels/ in the bucket (appliances/ID/, "
        "groups/GROUP/, all/), every model_packages.pull_interval and after each drain.",
    )


Destination = Annotated[
    HttpDestination | DirectoryDestination | S3Destination, Field(discriminator="type")
]


class SyncSection(Strict):
    interval: Duration = Field(
        default=300.0, gt=0, description="How often the backlog is shipped while a link is up."
    )
    batch_records: int = Field(
        default=1000, ge=1, le=100_000, description="Most records in one batch."
    )
    batch_bytes: ByteSize = Field(
        default=1024**2, ge=1024, description="Most record bytes (uncompressed) in one batch."
    )
    chunk_size: ByteSize = Field(
        default=4 * 1024**2,
        ge=64 * 1024,
        description="Payload upload chunk; a cut upload re-sends at most one chunk.",
    )
    retry_max: Duration = Field(
        default=300.0,
        gt=0,
        description="Longest pause between attempts after failures while the destination "
        "answers (errors, cut transfers).",
    )
    probe_interval: Duration = Field(
        default=10.0,
        gt=0,
        description="How often an unreachable destination is probed; a link that returns is "
        "drained at once.",
    )
    destinations: list[Destination] = Field(
        default_factory=list, description="Where records and payloads go; `type` picks the kind."
    )

    @model_validator(mode="after")
    def _unique_destination_names(self) -> SyncSection:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("destination names must be unique")
        return self


class ApplianceConfig(Strict):
    """The whole configuration file."""

    appliance: ApplianceSection = Field(description="Identity, data directory and daemon policy.")
    storage: StorageSection = Field(
        default_factory=StorageSection, description="Disk budget and retention."
    )
    journal: JournalSection = Field(
        default_factory=JournalSection, description="The SQLite journal's commit policy."
    )
    sensors: list[Sensor] = Field(
        default_factory=list, description="Sensor sources; `type` picks the kind."
    )
    models: dict[Name, DetectorModel] = Field(
        default_factory=dict,
        description="Detectors by name; cameras refer to them. A camera naming `detector` "
        "when none is configured gets the built-in default.",
    )
    model_packages: ModelPackagesSection = Field(
        default_factory=ModelPackagesSection,
        description="Signed model packages (`package:NAME` models): trusted keys, this "
        "appliance's group, versions kept.",
    )
    cameras: list[Camera] = Field(
        default_factory=list, description="Camera sources and what to do with their frames."
    )
    sync: SyncSection = Field(
        default_factory=SyncSection, description="Shipping records and payloads upstream."
    )
    status: StatusSection = Field(
        default_factory=StatusSection, description="The local web status page and its API."
    )

    @model_validator(mode="after")
    def _unique_source_names(self) -> ApplianceConfig:
        seen: set[str] = set()
        for source in [*self.sensors, *self.cameras]:
            if source.name in seen:
                raise ValueError(f"two sources are named {source.name!r}; names must be unique")
            seen.add(source.name)
        return self

    @model_validator(mode="after")
    def _cameras_name_models(self) -> ApplianceConfig:
        for camera in self.cameras:
            if camera.model not in self.models and camera.model != "detector":
                raise ValueError(
                    f"camera {camera.name!r} uses model {camera.model!r}, which is not one of "
                    f"{sorted(self.models) or 'the configured models (none)'}"
                )
        return self

    def detector_for(self, camera: Camera) -> DetectorModel:
        """The model config a camera runs (the built-in default for an unconfigured `detector`)."""
        return self.models.get(camera.model) or DetectorModel()
