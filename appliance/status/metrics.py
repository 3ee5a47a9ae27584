"""Owns `/metrics`: one status report as Prometheus metric families (names, types and labels
follow Prometheus' conventions; docs/status-api.md lists them), from a registry of its own."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.status.alarms import count_by_kind_and_severity
from appliance.status.schema import StatusReport

# Every state of the journal's integrity check gets a series (sync.recovery.IntegrityState).
INTEGRITY_STATES = ("skipped", "pending", "running", "ok", "failed", "error", "salvaged")


class _ReportCollector(Collector):
    """Turns one /api/status report into Prometheus metric families."""

    def __init__(self, report: StatusReport) -> None:
        self.report = report

    def collect(self) -> Iterable[Metric]:
        report = self.report
        # The seq high-water mark: every record journalled took the next seq, and neither
        # eviction nor a rollup gives one back, so it only grows (a new journal starts again,
        # which Prometheus reads as a counter reset).
        yield CounterMetricFamily(
            "appliance_records_journalled",
            "Records ever journalled (the journal's last seq; eviction does not lower it).",
            value=report["last_seq"],
        )
        records = GaugeMetricFamily(
            "appliance_journal_records",
            "Records in the journal now, by priority and kind (falls when records are evicted).",
            labels=["priority", "kind"],
        )
        journal_bytes = GaugeMetricFamily(
            "appliance_journal_record_bytes",
            "Estimated bytes of the records in the journal now, by priority and kind.",
            labels=["priority", "kind"],
        )
        for entry in report["records"]["by_priority_and_kind"]:
            records.add_metric([entry["priority"], entry["kind"]], entry["records"])
            journal_bytes.add_metric([entry["priority"], entry["kind"]], entry["bytes"])
        yield records
        yield journal_bytes
        yield from _destination_counters(report)
        backlog_records = GaugeMetricFamily(
            "appliance_sync_backlog_records",
            "Records not yet acknowledged by a destination.",
            labels=["destination", "priority"],
        )
        backlog_bytes = GaugeMetricFamily(
            "appliance_sync_backlog_bytes",
            "Estimated bytes of records not yet acknowledged by a destination.",
            labels=["destination", "priority"],
        )
        reachable = GaugeMetricFamily(
            "appliance_sync_reachable",
            "1 when the destination answered its last probe, 0 when not (absent: unknown).",
            labels=["destination"],
        )
        refused = GaugeMetricFamily(
            "appliance_sync_refused",
            "1 while the destination refuses the backlog permanently (its cursor is held).",
            labels=["destination"],
        )
        collision = GaugeMetricFamily(
            "appliance_sync_journal_collision",
            "1 while the destination reports another journal shipping under this appliance id.",
            labels=["destination"],
        )
        for name, dest in report["destinations"].items():
            for priority, figures in dest["backlog"].items():
                backlog_records.add_metric([name, priority], figures["records"])
                backlog_bytes.add_metric([name, priority], figures["bytes"])
            if dest["reachable"] is not None:
                reachable.add_metric([name], 1.0 if dest["reachable"] else 0.0)
            refused.add_metric([name], 1.0 if dest.get("refused") else 0.0)
            collision.add_metric([name], 1.0 if dest.get("collision") else 0.0)
        yield backlog_records
        yield backlog_bytes
        yield from _destination_backlog(report)
        yield reachable
        yield refused
        yield collision
        yield GaugeMetricFamily(
            "appliance_sync_oldest_unsynced_seconds",
            "Age of the oldest record some destination has not acknowledged (0: none).",
            value=report["oldest_unsynced_age_s"] or 0.0,
        )
        evictions = CounterMetricFamily(
            "appliance_evictions",
            "Records evicted by retention, by priority and reason.",
            labels=["priority", "reason"],
        )
        evicted_bytes = CounterMetricFamily(
            "appliance_evicted_bytes",
            "Estimated bytes of the records evicted by retention, by priority and reason.",
            labels=["priority", "reason"],
        )
        for evicted in report["evictions"]:
            evictions.add_metric([evicted["priority"], evicted["reason"]], evicted["records"])
            evicted_bytes.add_metric([evicted["priority"], evicted["reason"]], evicted["bytes"])
        yield evictions
        yield evicted_bytes
        rolled = CounterMetricFamily(
            "appliance_rollup_records_replaced",
            "Telemetry records replaced by rollups (storage.tiers), by tier resolution and kind.",
            labels=["resolution", "of"],
        )
        written = CounterMetricFamily(
            "appliance_rollups_written",
            "Rollup records written by tiered telemetry, by tier resolution and kind.",
            labels=["resolution", "of"],
        )
        saved = CounterMetricFamily(
            "appliance_rollup_saved_bytes",
            "Journal bytes tiered telemetry saved (the records' size estimate, before - after).",
            labels=["resolution", "of"],
        )
        for tier in report["rollups"]:
            labels = [f"{tier['resolution_s']}s", tier["of"]]
            rolled.add_metric(labels, tier["records"])
            written.add_metric(labels, tier["rollups"])
            saved.add_metric(labels, max(0, tier["bytes_before"] - tier["bytes_after"]))
        yield rolled
        yield written
        yield saved
        drops = CounterMetricFamily(
            "appliance_drops",
            "Records refused before reaching the journal (full disk, shedding), by reason.",
            labels=["priority", "reason"],
        )
        for dropped in report["drops"]:
            drops.add_metric([dropped["priority"], dropped["reason"]], dropped["records"])
        yield drops
        quality = CounterMetricFamily(
            "appliance_data_quality",
            "Bad input counted per source and reason (NaN, malformed, out of range, ...).",
            labels=["source", "reason"],
        )
        for bad in report["data_quality"]:
            quality.add_metric([bad["source"], bad["reason"]], bad["count"])
        yield quality
        up = GaugeMetricFamily(
            "appliance_source_up", "1 when the source is running, else 0.", labels=["source"]
        )
        reconnects = CounterMetricFamily(
            "appliance_source_reconnects",
            "Successful reconnects of a source since the daemon started.",
            labels=["source"],
        )
        readings_dropped = CounterMetricFamily(
            "appliance_source_readings_dropped",
            "Readings a live source dropped because its consumer fell behind (oldest first).",
            labels=["source"],
        )
        for name, source in report["daemon"]["sources"].items():
            up.add_metric([name], 1.0 if source["state"] == "running" else 0.0)
            reconnects.add_metric([name], source["reconnects"])
            readings_dropped.add_metric([name], source["readings_dropped"])
        yield up
        yield reconnects
        yield readings_dropped
        psi = GaugeMetricFamily(
            "appliance_drift_psi",
            "Population stability index of a quantity's last window against its reference.",
            labels=["source", "quantity"],
        )
        drifting = GaugeMetricFamily(
            "appliance_drift_active",
            "1 while any quantity of the source drifts from its reference, else 0.",
            labels=["source"],
        )
        daemon = report["daemon"]
        entries = [*daemon["sources"].items(), *daemon["cameras"].items()]
        for name, drift in ((n, e.get("drift")) for n, e in entries):
            if drift is None:
                continue  # a camera's is in `cameras`; its entry in `sources` has none
            drifting.add_metric([name], 1.0 if drift["state"] == "drift" else 0.0)
            for quantity, figures in drift["quantities"].items():
                if figures["psi"] is not None:
                    psi.add_metric([name, quantity], figures["psi"])
        yield psi
        yield drifting
        disk = report["disk"]
        yield GaugeMetricFamily(
            "appliance_disk_used_bytes",
            "Bytes the journal and payloads use (what the disk budget counts).",
            value=disk["used_bytes"],
        )
        yield GaugeMetricFamily(
            "appliance_disk_budget_bytes", "storage.disk_budget.", value=disk["budget_bytes"]
        )
        journal = report["daemon"].get("journal")
        if journal is not None and "integrity" in journal:
            integrity = GaugeMetricFamily(
                "appliance_journal_integrity",
                "1 for the state of the journal's integrity check (skipped, pending, running, ok, "
                "failed, error, salvaged), 0 for the others.",
                labels=["state"],
            )
            for state in INTEGRITY_STATES:
                integrity.add_metric(
                    [state], 1.0 if journal["integrity"]["state"] == state else 0.0
                )
            yield integrity
            yield GaugeMetricFamily(
                "appliance_journal_last_stop_clean",
                "1 when the run before this one stopped cleanly, 0 when not (a crash, a power cut).",
                value=1.0 if journal["last_stop"] == "clean" else 0.0,
            )
        yield GaugeMetricFamily(
            "appliance_uptime_seconds",
            "Seconds since the daemon started.",
            value=report["uptime_s"],
        )
        yield GaugeMetricFamily(
            "appliance_healthy", "1 when /healthz answers 200, else 0.", value=report["healthy"]
        )
        alarms = GaugeMetricFamily(
            "appliance_alarms_active",
            "Alarms open now (limits, anomalies, zones, deliveries, storage, journal), by kind "
            "and severity; every pair is present, 0 when none.",
            labels=["kind", "severity"],
        )
        for (kind, severity), count in count_by_kind_and_severity(report["alarms"]).items():
            alarms.add_metric([kind, severity], count)
        yield alarms
        info = GaugeMetricFamily(
            "appliance_info",
            "The appliance's identity; always 1.",
            labels=["version", "appliance_id"],
        )
        info.add_metric([report["version"], report["appliance_id"]], 1.0)
        yield info


def _destination_counters(report: StatusReport) -> Iterable[Metric]:
    """What each destination's engine did since the daemon started (`sync.engine`'s
    DestinationState): counters that start again at 0 with the daemon, which `rate()` reads
    as a reset. A record counts as acknowledged once the destination confirmed its batch and
    the cursor moved past it."""
    acknowledged = CounterMetricFamily(
        "appliance_records_acknowledged",
        "Records the destination acknowledged since the daemon started (its cursor moved past).",
        labels=["destination"],
    )
    sent_bytes = CounterMetricFamily(
        "appliance_sync_sent_bytes",
        "Bytes sent to the destination since the daemon started (record batches and payloads).",
        labels=["destination"],
    )
    payloads = CounterMetricFamily(
        "appliance_sync_payloads_sent",
        "Payloads (snapshots, clips) uploaded to the destination since the daemon started.",
        labels=["destination"],
    )
    for name, live in report["daemon"].get("destinations", {}).items():
        acknowledged.add_metric([name], live["records_sent"])
        sent_bytes.add_metric([name], live["bytes_sent"])
        payloads.add_metric([name], live["payloads_sent"])
    yield acknowledged
    yield sent_bytes
    yield payloads


def _destination_backlog(report: StatusReport) -> Iterable[Metric]:
    """Per destination, what waits besides records: the age of its oldest record and the
    payloads it has not received."""
    age = GaugeMetricFamily(
        "appliance_sync_backlog_age_seconds",
        "Age of the oldest record the destination has not acknowledged (0: none waits).",
        labels=["destination"],
    )
    payloads = GaugeMetricFamily(
        "appliance_sync_backlog_payloads",
        "Payloads (snapshots, clips) the destination has not received.",
        labels=["destination"],
    )
    payload_bytes = GaugeMetricFamily(
        "appliance_sync_backlog_payload_bytes",
        "Bytes of the payloads the destination has not received.",
        labels=["destination"],
    )
    for name, dest in report["destinations"].items():
        age.add_metric([name], dest["oldest_unsynced_age_s"] or 0.0)
        payloads.add_metric([name], dest["payloads_waiting"])
        payload_bytes.add_metric([name], dest["payload_bytes_waiting"])
    yield age
    yield payloads
    yield payload_bytes


def render_metrics(report: StatusReport) -> bytes:
    """Prometheus text for one report, from a registry of its own (never the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ReportCollector(report))
    return generate_latest(registry)


__all__ = ["render_metrics"]
