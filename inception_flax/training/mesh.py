"""The device mesh: every device of every process on one data-parallel axis, `AXIS`."""

import jax
import numpy as np

AXIS = "batch"


def create_mesh() -> jax.sharding.Mesh:
    """All devices on one axis, grouped by process (process 0's first).

    Each process's slice of the global batch is then one contiguous block, in
    process order, and device i of the mesh (its dropout key, its BN statistics)
    sees the same examples whatever the number of processes.
    """
    devices = jax.make_mesh((jax.device_count(),), (AXIS,)).devices.ravel()
    devices = sorted(devices, key=lambda d: d.process_index)  # stable within a process
    return jax.sharding.Mesh(np.array(devices), (AXIS,))
