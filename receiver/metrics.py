"""Owns the receiver's `/metrics` (Prometheus text): this replica's traffic counters (batches,
records, payload bytes, refusals), counted as requests are answered, and the fleet's gauges per
appliance (last seen, lag, backlog, health, alerts), read from the store so that every replica
answers the same. Names follow Prometheus' conventions; docs/fleet.md lists them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from receiver.backend import FleetFigures, parse_ts
from receiver.protocol import Refusal


class ReceiverMetrics:
    """This replica's counters, in a registry of its own (never the global one). Prometheus
    sums them over replicas; `rate()` of each is the fleet's ingest rate."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.batches = Counter(
            "receiver_batches",
            "Batches acknowledged (a resend of a batch already stored counts again).",
            registry=self.registry,
        )
        self.records = Counter(
            "receiver_records_received",
            "Records stored for the first time.",
            registry=self.registry,
        )
        self.duplicates = Counter(
            "receiver_records_duplicate",
            "Records received again and ignored (already stored with the same content).",
            registry=self.registry,
        )
        self.payload_bytes = Counter(
            "receiver_payload_received_bytes",
            "Payload bytes received in upload chunks.",
            registry=self.registry,
        )
        self.payloads = Counter(
            "receiver_payloads_completed",
            "Payloads whose bytes were verified against their sha256 and kept.",
            registry=self.registry,
        )
        self.refusals = Counter(
            "receiver_refusals",
            "Requests answered with an error, by status code and the answer's `error`.",
            ["code", "reason"],
            registry=self.registry,
        )

    def batch(self, stored: int, duplicates: int) -> None:
        self.batches.inc()
        self.records.inc(stored)
        self.duplicates.inc(duplicates)

    def refused(self, code: int, reason: str) -> None:
        self.refusals.labels(str(code), reason).inc()

    def render(self, fleet: FleetFigures) -> bytes:
        """The counters, then the fleet's gauges at the store's time."""
        gauges = CollectorRegistry(auto_describe=False)
        gauges.register(_FleetCollector(fleet))
        return generate_latest(self.registry) + generate_latest(gauges)

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """Counts every refusal (a `Refusal` or an HTTP error) on its way to the JSON error
        middleware; its `error` words are a fixed vocabulary, so the labels stay few."""

        @web.middleware
        async def count_refusals(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            try:
                response = await handler(request)
            except Refusal as refusal:
                self.refused(refusal.status, refusal.error)
                raise
            except web.HTTPException as exc:
                if exc.status >= 400:
                    self.refused(exc.status, exc.reason.lower())
                raise
            if response.status >= 400:
                self.refused(response.status, response.reason.lower())
            return response

        return count_refusals


def _health_state(health: dict[str, object] | None) -> float | None:
    state = None if health is None else health.get("state")
    if state == "ok":
        return 1.0
    if isinstance(state, str):
        return 0.0
    return None


class _FleetCollector(Collector):
    """Per appliance, from one `RecordStore.fleet` answer."""

    def __init__(self, fleet: FleetFigures) -> None:
        self.fleet = fleet

    def collect(self) -> Iterable[Metric]:
        now = self.fleet.now_s
        rows = self.fleet.rows
        yield GaugeMetricFamily(
            "receiver_appliances", "Appliances that have shipped anything.", value=len(rows)
        )
        last_seen = GaugeMetricFamily(
            "receiver_appliance_last_seen_timestamp_seconds",
            "When the appliance's last batch or payload arrived (Unix time, the store's clock).",
            labels=["appliance"],
        )
        lag = GaugeMetricFamily(
            "receiver_appliance_lag_seconds",
            "How far behind the shore is: the store's time minus the time of the newest `health` "
            "record received from the appliance. Health is telemetry, shipped after everything "
            "else, so this is the oldest view of any priority; its resolution is the "
            "appliance's health_interval. Absent until a health record arrived.",
            labels=["appliance"],
        )
        backlog_records = GaugeMetricFamily(
            "receiver_appliance_backlog_records",
            "Records the appliance had not shipped yet, summed over its destinations, as its "
            "newest health record reported.",
            labels=["appliance"],
        )
        backlog_bytes = GaugeMetricFamily(
            "receiver_appliance_backlog_bytes",
            "Estimated bytes of records and payloads the appliance had not shipped yet, summed "
            "over its destinations, as its newest health record reported.",
            labels=["appliance"],
        )
        healthy = GaugeMetricFamily(
            "receiver_appliance_healthy",
            "1 when the appliance's newest health record says ok, 0 when degraded.",
            labels=["appliance"],
        )
        alerts = GaugeMetricFamily(
            "receiver_appliance_alerts_24h",
            "Alert records of the last 24 hours (by their own time).",
            labels=["appliance"],
        )
        for row in rows:
            labels = [row.appliance_id]
            last_seen.add_metric(labels, parse_ts(row.last_seen))
            alerts.add_metric(labels, row.alerts_24h)
            if row.health_ts is not None:
                try:
                    lag.add_metric(labels, max(0.0, now - parse_ts(row.health_ts)))
                except ValueError:
                    pass  # a ts that is not ISO-8601 has no age
            state = _health_state(row.health)
            if state is not None:
                healthy.add_metric(labels, state)
            backlog = None if row.health is None else row.health.get("backlog")
            if isinstance(backlog, dict):
                waiting = [d for d in backlog.values() if isinstance(d, dict)]
                backlog_records.add_metric(labels, sum(_count(d, "records") for d in waiting))
                backlog_bytes.add_metric(
                    labels,
                    sum(_count(d, "bytes") + _count(d, "payload_bytes") for d in waiting),
                )
        yield last_seen
        yield lag
        yield backlog_records
        yield backlog_bytes
        yield healthy
        yield alerts


def _count(figures: dict[str, object], key: str) -> int:
    value = figures.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


__all__ = ["ReceiverMetrics"]
