"""The appliance: the `appliance` command, the daemon (the composition root), its scheduler,
supervision, health and the operator's commands. Imports every other package."""

import os

# numpy's OpenBLAS wakes a thread pool for every small matrix product (Hotelling's T², feature
# windows) and spins it: on a 2-core box that cost 4-6 ms a window and a tenth of a core
# (bench/sensor_throughput.py). Set before numpy is first imported; an operator's value wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
