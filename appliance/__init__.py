"""The appliance: the `appliance` command (`cli`), the daemon that wires everything together
(`daemon`, the composition root) and `sync --now`. Its rooms, each importing only those below:
`runtime` (the floor: logs, supervisor, scheduler, control socket) < `stages` (records in) <
`models` (the model lifecycle) < `status` (what the operator sees) < this root. Imports every
other package."""

import os

# numpy's OpenBLAS wakes a thread pool for every small matrix product (Hotelling's T², feature
# windows) and spins it: on a 2-core box that cost 4-6 ms a window and a tenth of a core
# (bench/sensor_throughput.py). Set before numpy is first imported; an operator's value wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
