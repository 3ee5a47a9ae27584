"""The floor every room of the appliance stands on: the daemon's runtime machinery that imports
no room above it. Logging (`logs`), restart budgets (`supervisor`), interval jobs on an injectable
clock (`scheduler`) and the control socket the CLI talks to the daemon through (`control`)."""
