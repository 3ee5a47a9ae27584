"""Owns the status page's one script (`/app.js`: live updates from the event stream or by
polling, which leave the clips on the page as they are, local times, table cells labelled for a
phone, "Sync now") and its one style sheet (`/app.css`). Both are served by this server; the
CSP allows no inline script or style."""

# Live updates come from the event stream; when the browser has no EventSource, or the stream
# fails three times in a row without delivering (a proxy that buffers, a server that refuses),
# the page falls back to fetching /partial every 3 s. `data-updates` on #live says which
# ("stream", "polling"), for a person looking at the DOM and for the browser tests. Each
# fragment, as it is shown, gets its times in the browser's time zone and its table cells
# labelled from their column heads (what a narrow screen shows beside each value, as the rows
# stack into cards there).
SCRIPT = """"use strict";
(function () {
  const live = document.getElementById("live");
  let polling = null;
  function pad(n) {
    return String(n).padStart(2, "0");
  }
  function shortTime(at, now) {
    const clock = pad(at.getHours()) + ":" + pad(at.getMinutes()) + ":" + pad(at.getSeconds());
    if (at.toDateString() === now.toDateString()) {
      return clock;
    }
    const day = { month: "short", day: "numeric" };
    if (at.getFullYear() !== now.getFullYear()) {
      day.year = "numeric";
    }
    return at.toLocaleDateString(undefined, day) + " " + clock.slice(0, 5);
  }
  function localTimes(root) {
    const now = new Date();
    for (const element of root.querySelectorAll("time[datetime]")) {
      const at = new Date(element.getAttribute("datetime"));
      if (!Number.isNaN(at.getTime())) {
        element.textContent = shortTime(at, now);
      }
    }
  }
  function labelCells(root) {
    for (const table of root.querySelectorAll("table")) {
      const head = Array.from(table.rows[0] ? table.rows[0].cells : [], (th) => th.textContent.trim());
      for (const row of Array.from(table.rows).slice(1)) {
        Array.from(row.cells).forEach((cell, index) => {
          cell.dataset.label = head[index] || "";
        });
      }
      table.classList.add("cards");
    }
  }
  function show(html) {
    // A clip survives the update: its element is moved into the new fragment in place of its
    // fresh copy, in the same task, so one being watched never pauses or starts over, and none
    // fetches its index again at every update.
    const clips = new Map();
    for (const video of live.querySelectorAll("video[data-clip]")) {
      clips.set(video.dataset.clip, video);
    }
    live.innerHTML = html;
    for (const fresh of live.querySelectorAll("video[data-clip]")) {
      const kept = clips.get(fresh.dataset.clip);
      if (kept !== undefined) {
        fresh.replaceWith(kept);
        clips.delete(fresh.dataset.clip);
      }
    }
    live.classList.remove("stale");
    localTimes(live);
    labelCells(live);
  }
  localTimes(live);
  labelCells(live);
  async function refresh() {
    try {
      const response = await fetch("/partial", { cache: "no-store", credentials: "same-origin" });
      if (response.ok) {
        show(await response.text());
      } else {
        live.classList.add("stale");
      }
    } catch (error) {
      live.classList.add("stale");
    }
  }
  function poll() {
    if (polling === null) {
      live.dataset.updates = "polling";
      polling = setInterval(refresh, 3000);
      refresh();
    }
  }
  if (typeof EventSource === "function") {
    const stream = new EventSource("/api/stream");
    let failures = 0;
    stream.addEventListener("live", (event) => {
      failures = 0;
      live.dataset.updates = "stream";
      show(event.data);
    });
    stream.addEventListener("error", () => {
      live.classList.add("stale");
      failures += 1;
      if (stream.readyState === EventSource.CLOSED || failures >= 3) {
        stream.close();
        poll();
      }
    });
  } else {
    poll();
  }
  const form = document.getElementById("sync-form");
  if (form === null) {
    return;  // no token configured: the page says how to enable "Sync now" instead
  }
  const result = document.getElementById("sync-result");
  const where = "the text in the file that status.token_file names in the appliance's config";
  function say(text, good) {
    result.textContent = text;
    result.className = good ? "good" : "bad";
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = form.elements.token.value.trim();
    if (!token) {
      say("Type the status token first: it is " + where + ".", false);
      return;
    }
    const destination = form.elements.destination.value;
    const url = "/api/sync" + (destination ? "?destination=" + encodeURIComponent(destination) : "");
    say("asking...", true);
    try {
      const response = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { Authorization: "Bearer " + token },
      });
      const text = await response.text();
      if (response.status === 202) {
        const answer = JSON.parse(text);
        const started = answer.started.join(", ") || "nothing new";
        const running = answer.already_running.length ? "; already running: " + answer.already_running.join(", ") : "";
        say("Sync started: " + started + running + ".", true);
      } else if (response.status === 401) {
        say("Not started: that token is not the status token. It is " + where + ".", false);
      } else {
        say("Not started: " + text, false);
      }
    } catch (error) {
      say("Not started: the appliance did not answer (" + error + ").", false);
    }
  });
})();
"""

STYLE = """body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 0.5rem 1rem;
  max-width: 70rem; line-height: 1.4; overflow-wrap: anywhere; }
h1 { font-size: 1.4rem; margin-bottom: 0; }
h2 { font-size: 1.1rem; margin: 1.2rem 0 0.4rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; margin-bottom: 0.5rem; }
th, td { text-align: left; padding: 0.2rem 0.5rem; border-bottom: 1px solid #ddd;
  vertical-align: top; overflow-wrap: normal; }
code { font-size: 0.85rem; }
time { white-space: nowrap; }
.what { display: block; min-width: 12rem; max-width: 40rem; overflow-wrap: anywhere; }
.thumb { display: inline-block; margin: 0.3rem 0.3rem 0 0; }
.thumb img { display: block; box-sizing: border-box; max-width: 10rem; max-height: 7.5rem;
  border: 1px solid #ccc; }
.clip { display: inline-block; margin: 0.3rem 0.3rem 0 0; vertical-align: top; }
.clip video { display: block; width: 20rem; max-width: 100%; height: auto; background: #000; }
.good { color: #176f2c; font-weight: 600; }
.bad { color: #b3261e; font-weight: 600; }
.alarm { border: 2px solid #b3261e; background: #fdecea; padding: 0 0.8rem; margin: 0.8rem 0; }
.muted { color: #666; font-weight: normal; }
.stale { opacity: 0.5; }
.strip { display: flex; flex-wrap: wrap; gap: 0.4rem 1rem; align-items: center;
  margin: 0.6rem 0; }
.strip p { margin: 0; }
.strip .label { font-size: 0.75rem; text-transform: uppercase; letter-spacing: 0.05em;
  color: #555; margin-right: 0.3rem; }
.alarm-count { padding: 0.2rem 0.6rem; border-radius: 1rem; border: 2px solid #888; }
.alarm-count.warning { border-color: #b36b00; background: #fff4e0; }
.alarm-count.critical { border-color: #b3261e; background: #b3261e; color: #fff; }
.alarm-count.critical .label { color: #fff; }
.alarms h2 { margin-top: 0.6rem; }
.alarm-list { list-style: none; padding: 0; margin: 0; }
.alarm-item { border-left: 0.5rem solid #b36b00; background: #fff4e0; padding: 0.4rem 0.6rem;
  margin-bottom: 0.4rem; }
.alarm-item.critical { border-left-color: #b3261e; background: #fdecea; }
.alarm-item .severity { display: inline-block; font-size: 0.75rem; font-weight: 700;
  letter-spacing: 0.05em; padding: 0 0.4rem; border-radius: 0.2rem; color: #fff;
  background: #8a5300; }
.alarm-item.critical .severity { background: #b3261e; }
.alarm-meta { display: block; font-size: 0.85rem; color: #444; }
form { display: flex; flex-wrap: wrap; gap: 0.5rem; align-items: center; }
input, select, button { font-size: 1rem; padding: 0.3rem; max-width: 100%; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(18rem, 100%), 1fr));
  gap: 1rem; }
.chart { margin: 0; max-width: 34rem; }  /* one chart alone must not fill the page */
.chart figcaption { font-size: 0.9rem; font-weight: 600; }
.chart svg { display: block; width: 100%; height: auto; }
.chart .axis { stroke: #888; stroke-width: 1; }
.chart .grid { stroke: #ddd; stroke-width: 1; stroke-dasharray: 4 3; }
.chart .label { font-size: 12px; fill: #555; }
.chart .line { fill: none; stroke-width: 1.8; stroke-linecap: round; stroke-linejoin: round; }
.legend { list-style: none; padding: 0; margin: 0.2rem 0 0; display: flex; flex-wrap: wrap;
  gap: 0.2rem 1rem; font-size: 0.8rem; }
.swatch { display: inline-block; width: 0.8rem; height: 0.25rem; margin-right: 0.3rem;
  vertical-align: middle; }
.line.s0 { stroke: #1f6feb; } .swatch.s0 { background: #1f6feb; }
.line.s1 { stroke: #d9480f; } .swatch.s1 { background: #d9480f; }
.line.s2 { stroke: #2b8a3e; } .swatch.s2 { background: #2b8a3e; }
.line.s3 { stroke: #862e9c; } .swatch.s3 { background: #862e9c; }
.line.s4 { stroke: #c2255c; } .swatch.s4 { background: #c2255c; }
.line.s5 { stroke: #5c940d; } .swatch.s5 { background: #5c940d; }
/* A phone: each table row becomes a card of "column: value" lines (the script labels the
   cells), so no table is wider than the screen. */
@media (max-width: 40rem) {
  body { padding: 0.5rem; }
  table.cards, table.cards tbody, table.cards tr, table.cards td { display: block; width: auto; }
  table.cards tr:first-child { display: none; }
  table.cards tr { border: 1px solid #ddd; border-radius: 0.3rem; margin-bottom: 0.5rem;
    padding: 0.2rem 0.4rem; }
  table.cards td { border: 0; padding: 0.1rem 0; font-size: 0.85rem;
    overflow-wrap: anywhere; }
  table.cards td::before { content: attr(data-label) ": "; color: #666; }
  .what { min-width: 0; }
  .thumb img { max-width: 8rem; }
  .clip { display: block; }
  .clip video { width: 100%; }
}
"""
