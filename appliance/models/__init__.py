"""The model lifecycle: what models the stages run and how that changes while the daemon runs.
Signed packages on disk (`store`), pulled from upstream (`updates`), tried in shadow and
activated or rolled back by one lifecycle (`trial`) that the detector canary (`canary`, its
shadow runs in `shadow`) and the baseline refit (`refit`, its candidates made in `candidate`)
share, and the operator's `models` commands (`cli`). Models import stages and the floor, never
status or the daemon."""
