"""Every network's variable names and shapes stay as they were pinned.

Converted weights and the checkpoints of earlier runs load by these paths, so a
refactor of the layers must leave them alone. `tests/data/variable_layout.txt`
holds one line per variable: case, collection/path, shape. To pin a deliberate
change, run `PYTHONPATH=. python tests/test_variable_layout.py` and review the diff.
"""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from inception_flax import models

PINNED = os.path.join(os.path.dirname(__file__), "data", "variable_layout.txt")
CASES = {
    "inception_v1": dict(aux_logits=True),
    "inception_v1-torchvision": dict(aux_logits=True, layout="torchvision"),
    "bn_inception": dict(),
    "inception_v2": dict(aux_logits=True),
    "inception_v3": dict(aux_logits=True),
    "inception_v4": dict(aux_logits=True),
    "inception_resnet_v1": dict(aux_logits=True),
    "inception_resnet_v2": dict(aux_logits=True),
}


def layout(case: str) -> list[str]:
    """'case collection/path shape' lines of the variables `model.init` creates."""
    name = case.split("-")[0]
    model = models.create_model(name, **CASES[case])
    size = models.spec(name).image_size
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    lines = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[0] != "intermediates":
            lines.append(f"{case} {'/'.join(keys)} {'x'.join(map(str, leaf.shape))}")
    return sorted(lines)


def pinned(case: str) -> list[str]:
    with open(PINNED) as f:
        return sorted(line for line in f.read().splitlines() if line.split(" ")[0] == case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_variable_names_and_shapes_are_the_pinned_ones(case):
    want, got = pinned(case), layout(case)
    assert want, f"{case} is not pinned in {PINNED}"
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"


if __name__ == "__main__":
    with open(sys.argv[1] if len(sys.argv) > 1 else PINNED, "w") as f:
        f.write("\n".join(line for case in sorted(CASES) for line in layout(case)) + "\n")
