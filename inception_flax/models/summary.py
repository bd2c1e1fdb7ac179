"""Per-block parameters, multiply-adds and output shapes of a network.

Multiply-adds come from XLA's cost analysis, asked for each convolution and
matrix product of the traced forward pass. Two conventions are made explicit so
the figures are comparable with the published tables (fvcore / ptflops style):

- a convolution's zero padding is materialised before the op is costed, so the
  taps that fall on padding count (XLA alone counts only the taps on real pixels);
- the body of an `nn.scan` counts once per repetition (XLA counts a loop body once).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from inception_flax.models.network import InceptionNet
from inception_flax.models.ops import PLAIN


class Summary(NamedTuple):
    rows: list["Row"]
    output_shape: tuple[int, ...]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def macs(self) -> float:
        return sum(r.macs for r in self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "macs": self.macs, "output_shape": list(self.output_shape)}


class Row(NamedTuple):
    block: str
    params: int
    macs: float
    output_shape: tuple[int, ...] | None


def _block_of(name_stack: str) -> str:
    """The top-level submodule an op belongs to ('' for the model's own ops)."""
    parts = [p for p in name_stack.split("/")[1:] if "." not in p]
    return parts[0] if parts else ""


@functools.lru_cache(maxsize=None)
def _xla_macs(prim: Any, params: tuple, shapes: tuple) -> float:
    """XLA's multiply-add count for one op on arguments of `shapes`."""
    kwargs = dict(params)
    # Counted on the CPU whatever the default device: only the lowering is needed, and
    # not every backend reports costs before compiling.
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=cpu) for s in shapes]
    if prim.name == "conv_general_dilated":
        padding = kwargs["padding"]
        kwargs["padding"] = tuple((0, 0) for _ in padding)
        spatial = kwargs["dimension_numbers"].lhs_spec[2:]

        def op(lhs, rhs):
            pads = [(0, 0, 0)] * lhs.ndim
            for axis, (lo, hi) in zip(spatial, padding):
                pads[axis] = (lo, hi, 0)
            return prim.bind(jax.lax.pad(lhs, 0.0, pads), rhs, **kwargs)
    else:
        def op(*xs):
            return prim.bind(*xs, **kwargs)
    return jax.jit(op).lower(*args).cost_analysis()["flops"] / 2


def walk_ops(jaxpr: jcore.Jaxpr, prefix: str = "", mult: int = 1):
    """(equation, name stack, times it runs) for every op, nested jaxprs included.

    The body of a `scan` runs `length` times per run of the scan.
    """
    for eqn in jaxpr.eqns:
        scope = str(eqn.source_info.name_stack)
        stack = f"{prefix}/{scope}" if prefix else scope
        yield eqn, stack, mult
        inner_mult = mult * eqn.params["length"] if eqn.primitive.name == "scan" else mult
        for value in eqn.params.values():
            if isinstance(value, jcore.ClosedJaxpr):
                yield from walk_ops(value.jaxpr, stack, inner_mult)
            elif isinstance(value, jcore.Jaxpr):
                yield from walk_ops(value, stack, inner_mult)


def forward_jaxpr(model: InceptionNet, image_size: int, batch: int = 1, capture=None):
    """The jaxpr of a forward pass (train mode when the model has aux heads), with its inputs.

    The model runs plain ops here whatever its own: XLA's convolution primitives (no
    custom gradients, no opaque native calls) are what the counts read."""
    model = model.clone(ops=PLAIN)
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), images)
    train = model.aux_logits  # the aux heads run (and cost) only in training

    def forward(v, x):
        return model.apply(
            v, x, train=train, mutable=["batch_stats", "intermediates"],
            rngs={"dropout": jax.random.key(0)}, capture_intermediates=capture or False)

    jaxpr = jax.make_jaxpr(forward)(variables, images)
    return jaxpr, forward, variables, images


def summarize(model: InceptionNet, image_size: int, batch: int = 1) -> Summary:
    """One row per top-level block, in execution order, and the logits' shape."""
    jaxpr, forward, variables, images = forward_jaxpr(
        model, image_size, batch,
        capture=lambda m, method: len(m.path) == 1 and method == "__call__")
    macs: dict[str, float] = {}
    for eqn, stack, mult in walk_ops(jaxpr.jaxpr):
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            shapes = tuple(tuple(v.aval.shape) for v in eqn.invars)
            block = _block_of(stack)
            macs[block] = macs.get(block, 0.0) + mult * _xla_macs(
                eqn.primitive, tuple(sorted(eqn.params.items())), shapes)
    logits, state = jax.eval_shape(forward, variables, images)
    shapes = {}
    for key, value in state["intermediates"].items():
        if key == "aux_logits":
            continue
        out = value["__call__"][0]
        out = out[0] if isinstance(out, tuple) else out  # scanned blocks return (x, None)
        shapes[key] = tuple(out.shape[-4:])  # and stack a leading repetition axis

    params = variables["params"]
    order = list(dict.fromkeys([*macs, *params]))
    rows = []
    for block in order:
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params.get(block, {})))
        rows.append(Row(block or "(top)", count, macs.get(block, 0.0), shapes.get(block)))
    return Summary(rows, tuple(logits.shape))
