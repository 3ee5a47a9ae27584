"""The appliance: the `appliance` command, the daemon (the composition root), its scheduler,
supervision, health and the operator's commands. Imports every other package."""
