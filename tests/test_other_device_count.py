"""A run written on one device count is read on another: eval.py, predict.py and
init_from restore a checkpoint into host arrays, whatever mesh saved it."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from inception_flax import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

READ = """
import json, sys
import jax
from inception_flax import pretrained
v = pretrained.restore_variables(sys.argv[1])
print(json.dumps({"devices": jax.device_count(), "step": int(v["step"]),
                  "w": v["params"]["w"].tolist(), "mean": v["batch_stats"]["mean"].tolist()}))
"""


def test_a_checkpoint_of_two_devices_is_read_on_one(tmp_path):
    assert jax.device_count() == 2  # conftest's fake devices write it
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), P())
    w, mean, ema = np.arange(6.0).reshape(2, 3), np.full(3, 0.5), np.arange(6.0).reshape(2, 3) + 1
    state = jax.device_put({"step": jnp.int32(7), "params": {"w": w},
                            "batch_stats": {"mean": mean}, "ema_params": {"w": ema}}, replicated)
    saver = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
    saver.save(7, state)
    saver.wait()
    saver.close()

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
    out = subprocess.run([sys.executable, "-c", READ, str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    read = json.loads(out.stdout.strip().splitlines()[-1])
    assert (read["devices"], read["step"]) == (1, 7)
    np.testing.assert_array_equal(read["w"], ema)  # the moving average, as eval.py uses it
    np.testing.assert_array_equal(read["mean"], mean)
