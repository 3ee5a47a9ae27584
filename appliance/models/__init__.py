"""The model lifecycle: what models the stages run and how that changes while the daemon runs.
Signed packages on disk (`store`), pulled from upstream (`updates`), tried in shadow and
activated or rolled back (`trial`, shared by the detector `canary` and the baseline `refit`),
and the operator's `models` commands (`cli`). Models import stages and the floor, never
status or the daemon."""
