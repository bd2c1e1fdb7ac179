"""Small utilities shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, image_size: int, seed: int = 0, batch: int = 2):
    """Variables of `model` filled on the host: fast, and BN statistics non-trivial.

    `model.init` compiles one random-number program per parameter, which costs
    seconds per network; the tests that only need *some* weights use this.
    """
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((batch, image_size, image_size, 3)),
                           train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if name.endswith("['kernel']"):
            fan_in = int(np.prod(shape[-4:-1] if len(shape) >= 4 else shape[-2:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif name.endswith("['scale']"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("['var']"):
            value = rng.uniform(0.5, 2.0, shape)
        else:  # biases, BN beta and running means
            value = rng.normal(0.0, 0.1, shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
