"""Owns putting a journalled record into words for an operator: `describe(kind, body)` gives
the status page's "what" column and the alarms' texts ("person entered cycle_lane, 0.87",
"vib_radial peak 3.51 over 2.0"), one wording per kind the stages write (their bodies are in
appliance/stages/, inference/, sync/ and appliance/models/), and a short key=value summary, never
cut mid-word, for a kind it does not know."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# The "what" column and an alarm's text stay one glance long; the record itself is in
# /api/events and `appliance export`.
MAX_CHARS = 160
_ELLIPSIS = "…"


def number(value: Any) -> str:
    """A measured value as a person reads it: three significant figures ("3.51", "0.00123"),
    a whole float with one decimal ("2.0": a limit is written as set), thousands whole."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if value == int(value):
        return f"{value:.1f}"
    if magnitude >= 100:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def score(value: Any) -> str:
    """A detection's confidence, 0..1: two decimals ("0.87")."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.2f}"
    return str(value)


def seconds(value: Any) -> str:
    """A length of time: "8.2 s", "3 min 20 s", "1 h 5 min"."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return str(value)
    if value < 60:
        return f"{number(round(float(value), 1)).removesuffix('.0')} s"
    whole = int(value)
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min" + (f" {rest} s" if rest else "")
    hours, rest = divmod(whole // 60, 60)
    return f"{hours} h" + (f" {rest} min" if rest else "")


def shorten(text: str, limit: int = MAX_CHARS) -> str:
    """`text` within `limit` characters, cut at a space or a comma (never inside a word), with
    an ellipsis where something was left out."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    room = text[: limit - len(_ELLIPSIS)]
    cut = max(room.rfind(" "), room.rfind(","))
    if cut <= 0:  # one word longer than the limit (a hash, a path): a readable head of it
        return room + _ELLIPSIS
    return room[:cut].rstrip(" ,;:") + _ELLIPSIS


def _words(text: Any) -> str:
    """A snake_case value as words: "no_active" -> "no active"."""
    return str(text).replace("_", " ")


def _listed(items: Sequence[Any], most: int = 3) -> str:
    shown = [str(i) for i in items[:most]]
    if len(items) > most:
        shown.append(f"{len(items) - most} more")
    return ", ".join(shown)


# --------------------------------------------------------------------------- per kind


def _limit(body: Mapping[str, Any]) -> str:
    channel, feature, value = body["channel"], body["feature"], body["value"]
    above, below = body.get("above"), body.get("below")
    if body.get("state") == "cleared":
        bounds = [f"{number(b)}" for b in (below, above) if b is not None]
        within = " to ".join(bounds) if len(bounds) == 2 else bounds[0]
        return f"{channel} {feature} back to {number(value)} (limit {within})"
    if above is not None and value > above:
        return f"{channel} {feature} {number(value)} over {number(above)}"
    if below is not None and value < below:
        return f"{channel} {feature} {number(value)} under {number(below)}"
    return f"{channel} {feature} {number(value)} outside its limit"


def _anomaly(body: Mapping[str, Any]) -> str:
    event = body.get("kind")
    if event == "ended" and "cause" in body:
        # Closed by a baseline swap, not by the data: say which baseline took over.
        return (
            f"anomaly ended: baseline {body.get('baseline')} replaced by "
            f"{body.get('replaced_by')} ({_words(body['cause'])})"
        )
    features = [f["name"] for f in body.get("features") or [] if isinstance(f, Mapping)]
    top = f"; most unusual: {_listed(features)}" if features else ""
    if event == "ended":
        return (
            f"anomaly ended after {body.get('windows')} windows, peak "
            f"{number(body.get('peak_ratio'))}x threshold{top}"
        )
    return (
        f"anomaly {event}: score {number(body['score'])} over threshold "
        f"{number(body['threshold'])} "
        f"({number(body.get('ratio'))}x){top}"
    )


def _anomaly_window(body: Mapping[str, Any]) -> str:
    return (
        f"raw data around an anomaly: {body['windows']} windows, {body['samples']} samples of "
        f"{_listed(body.get('channels') or [])}"
    )


def _baseline(body: Mapping[str, Any]) -> str:
    return (
        f"baseline {body['version']} {_words(body.get('state', 'fitted'))} "
        f"({body.get('method')}, {body.get('windows')} windows, threshold "
        f"{number(body.get('threshold'))})"
    )


def _drift(body: Mapping[str, Any]) -> str:
    event = body["kind"]
    verb = {"started": "drifting", "ended": "no longer drifting"}.get(event, _words(event))
    return f"{body['quantity']} {verb}: PSI {number(body['psi'])} (KS {number(body.get('ks'))})"


def _zone_entry(body: Mapping[str, Any]) -> str:
    return f"{body['label']} entered {body['zone']}, {score(body['score'])}"


def _object(body: Mapping[str, Any]) -> str:
    zones = body.get("zones_visited") or body.get("zones") or []
    where = f", in {_listed(zones)}" if zones else ""
    return (
        f"{body['label']} seen for {seconds(body['duration_s'])}, best "
        f"{score(body['best_score'])}{where}"
    )


def _clip(body: Mapping[str, Any]) -> str:
    zones = sorted({str(e["zone"]) for e in body.get("entries") or [] if isinstance(e, Mapping)})
    of = f" of {_listed(zones)}" if zones else ""
    capped = ", cut at the clip limit" if body.get("capped") else ""
    return (
        f"clip{of}: {seconds(body['duration_s'])}, {body['width']}x{body['height']} at "
        f"{number(body['fps']).removesuffix('.0')} fps{capped}"
    )


def _sample(body: Mapping[str, Any]) -> str:
    reason = _words(body.get("reason", "sample"))
    if "predictions" in body:
        labels = [p.get("label") for p in body["predictions"] if isinstance(p, Mapping)]
        seen = f": {_listed(labels)}" if labels else ": nothing detected"
        return f"frame sample ({reason}){seen}"
    channels = body.get("channels") or []
    return f"data sample ({reason}): {body.get('samples')} samples of {_listed(channels)}"


def _data_quality(body: Mapping[str, Any]) -> str:
    counts = body["counts"]
    parts = [f"{n} {_words(reason)}" for reason, n in counts.items()]
    return f"bad data: {', '.join(parts)}" if parts else "bad data"


def _reading(body: Mapping[str, Any]) -> str:
    parts = []
    for channel, features in (body.get("channels") or {}).items():
        name = "mean" if "mean" in features else next((f for f in features if f != "n"), None)
        if name is not None:
            parts.append(f"{channel} {name} {number(features[name])}")
    return ", ".join(parts) or "reading"


# `model` records: the lifecycle's steps (appliance/models/trial.py) and the pulls' (updates.py).
_MODEL_STEPS = {
    "staged": "staged",
    "refused": "refused",
    "canary_started": "on trial (canary started)",
    "canary_passed": "passed its canary",
    "canary_failed": "failed its canary",
    "activated": "activated",
    "watch_ended": "kept: watch ended without trouble",
    "rolled_back": "rolled back",
    "rollback_failed": "could not be rolled back",
    "refit_skipped": "refit skipped",
    "refit_failed": "refit failed",
}


def _model(body: Mapping[str, Any]) -> str:
    event = str(body.get("event"))
    what = _MODEL_STEPS.get(event, _words(event))
    if event == "refused" and "name" not in body:
        subject = f"model package {body.get('listed_as') or str(body.get('sha256', ''))[:12]}"
    else:
        name = body.get("name") or body.get("model") or "model"
        version = body.get("version")
        subject = f"{name} {version}" if version else str(name)
        if body.get("source") and event.startswith(("refit", "canary")) and "name" not in body:
            subject = f"{subject} for {body['source']}"
    text = f"{subject} {what}"
    if event in ("rolled_back", "rollback_failed") and body.get("previous"):
        text += f" to {body['previous']}"
    why = body.get("reason") or body.get("message") or body.get("detail")
    if why:
        text += f": {why}"
    elif body.get("cause"):
        text += f": {_words(body['cause'])}"
    return text


def _sync_refused(body: Mapping[str, Any]) -> str:
    return f"{body['destination']} refuses the backlog: {body['error']}"


def _journal_collision(body: Mapping[str, Any]) -> str:
    if body.get("event") == "cleared":
        return f"{body['destination']}: no other journal ships under this appliance id any more"
    return (
        f"another journal ships under this appliance id to {body['destination']}: "
        f"{_listed(body.get('journals') or [])}"
    )


def _eviction(body: Mapping[str, Any]) -> str:
    evicted = body["evicted"]
    total = sum(int(t["records"]) for t in evicted.values())
    parts = ", ".join(f"{p} {t['records']}" for p, t in evicted.items())
    return f"{total} records removed ({_words(body['reason'])}): {parts}"


def _span(seconds: Any) -> str:
    value = int(seconds) if isinstance(seconds, int | float) else 0
    for unit, size in (("h", 3600), ("min", 60)):
        if value >= size and value % size == 0:
            return f"{value // size} {unit}"
    return f"{value} s"


_ROLLED = {"reading": "readings", "health": "health snapshots"}


def _rollup(body: Mapping[str, Any]) -> str:
    replaced = (body.get("replaces") or {}).get("records", "?")
    what = _ROLLED.get(str(body.get("of")), f"{body.get('of')} records")
    text = f"{replaced} {what} as one {_span(body.get('resolution_s'))} aggregate"
    if body.get("anomaly_score_max") is not None:
        text += f", anomaly score up to {number(body['anomaly_score_max'])}"
    return text


def _rollup_pass(body: Mapping[str, Any]) -> str:
    tiers = body.get("tiers") or []
    parts = ", ".join(
        f"{t['records']} {_ROLLED.get(t['of'], t['of'])} into {t['rollups']} aggregates of "
        f"{_span(t['resolution_s'])}"
        for t in tiers
    )
    return f"older telemetry rolled up: {parts}" if parts else "older telemetry rolled up"


def _recovery(body: Mapping[str, Any]) -> str:
    found = []
    if body.get("salvaged"):
        found.append("the journal was damaged and salvaged")
    payloads = body.get("payloads") or {}
    if payloads.get("missing_files"):
        found.append(f"{payloads['missing_files']} payload files missing")
    if payloads.get("orphan_files_removed"):
        found.append(f"{payloads['orphan_files_removed']} stray payload files removed")
    if payloads.get("size_mismatches"):
        found.append(f"{payloads['size_mismatches']} payload files of the wrong size")
    return "journal checked at start: " + ("; ".join(found) or "temporary files removed")


_LAST_STOP = {
    "clean": "last stop clean",
    "unclean": "last stop not clean",
    "new": "a new journal",
}


def _integrity_check(body: Mapping[str, Any]) -> str:
    """A journal check's result, and the status report's `journal.integrity` (with the
    journal's `last_stop` added)."""
    state, check = body["state"], body.get("check") or "the check"
    stop = _LAST_STOP.get(str(body.get("last_stop")), "")
    took = f" in {seconds(body['seconds'])}" if body.get("seconds") is not None else ""
    if state == "failed":
        return f"journal damaged: restart to salvage ({check} found: {body.get('detail')})"
    if state == "salvaged":
        return "journal damaged at start: quarantined and salvaged"
    if state == "error":
        return (
            f"journal check did not finish ({body.get('detail')}); it runs again at the next start"
        )
    if state == "running":
        return f"{stop}: {check} running in the background"
    if state == "pending":
        return f"{stop}: {check} to run in the background"
    if state == "ok":
        return f"{stop}: {check} passed{took}"
    return f"{stop}: no check needed" if body.get("last_stop") == "clean" else stop or state


def _journal_fork(body: Mapping[str, Any]) -> str:
    return f"journal forked after seq {body['after_seq']}: now {body['journal_id']}"


def _lifecycle(body: Mapping[str, Any]) -> str:
    text = f"appliance {body['event']} ({body.get('mode')}, version {body.get('version')})"
    return text + (f": {_words(body['reason'])}" if body.get("reason") else "")


def _component(body: Mapping[str, Any]) -> str:
    text = f"{body['component']} {_words(body['event'])}"
    if body.get("restarts"):
        text += f" (restarts {body['restarts']})"
    return text + (f": {body['last_error']}" if body.get("last_error") else "")


def _health(body: Mapping[str, Any]) -> str:
    reasons = body.get("reasons") or []
    return f"health {body['state']}" + (f": {_listed(reasons)}" if reasons else "")


_BY_KIND: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "limit": _limit,
    "anomaly": _anomaly,
    "anomaly_window": _anomaly_window,
    "baseline": _baseline,
    "drift": _drift,
    "zone_entry": _zone_entry,
    "object": _object,
    "clip": _clip,
    "sample": _sample,
    "data_quality": _data_quality,
    "reading": _reading,
    "model": _model,
    "sync_refused": _sync_refused,
    "journal_collision": _journal_collision,
    "eviction": _eviction,
    "rollup": _rollup,
    "rollup_pass": _rollup_pass,
    "recovery": _recovery,
    "integrity_check": _integrity_check,
    "journal_fork": _journal_fork,
    "lifecycle": _lifecycle,
    "component": _component,
    "health": _health,
}
KINDS = frozenset(_BY_KIND)
"""The kinds with their own wording."""


def _brief(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{…}" if value else "{}"
    if isinstance(value, list | tuple):
        return f"[{len(value)}]"
    if isinstance(value, float):
        return number(value)
    return str(value)


def summary(body: Mapping[str, Any]) -> str:
    """Any body as `key=value` pairs, plain values first, nested ones as their size."""
    plain = [(k, v) for k, v in body.items() if not isinstance(v, Mapping | list | tuple)]
    nested = [(k, v) for k, v in body.items() if isinstance(v, Mapping | list | tuple)]
    return ", ".join(f"{k}={_brief(v)}" for k, v in [*plain, *nested])


def describe(kind: str, body: Mapping[str, Any]) -> str:
    """The record in words, at most MAX_CHARS characters, never cut inside a word."""
    wording = _BY_KIND.get(kind)
    text = ""
    if wording is not None:
        try:
            text = wording(body)
        # A body without what its kind's wording expects (written by an older version, or by
        # hand through the journal's API) still gets its summary rather than an error.
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            text = ""
    return shorten(text or summary(body) or kind)


__all__ = ["KINDS", "MAX_CHARS", "describe", "number", "score", "seconds", "shorten", "summary"]
