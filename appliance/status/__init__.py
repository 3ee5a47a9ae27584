"""What the operator sees: the typed status report (`report`) and the one judge of health
(`health`) that the page (`page`, served by `web` with its `/metrics` in `metrics`), the
journalled `health` record, `/healthz`, `/api/status` and `appliance status` all read; the
page's 24-hour history (`history`); records out of the journal (`export`). Status imports models,
stages and the floor, never the daemon."""
