"""Map a PyTorch state dict onto our parameter tree, checking every tensor."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from inception_flax.convert import inputs
from inception_flax.convert.reader import ConversionError
from inception_flax.convert.sources import LEAVES, SOURCES, Entry, Source

IGNORED_SUFFIXES = ("num_batches_tracked",)
MAX_LISTED = 12  # names per category in the one-line error


class Converted(NamedTuple):
    model: str                   # our registry name
    overrides: dict[str, Any]    # create_model kwargs (JSON-serialisable)
    variables: dict[str, Any]    # {"params": ..., "batch_stats": ...} of numpy float32
    source: str
    config: str
    input: dict[str, Any] | None = None  # the source's input convention (convert/inputs.py)


class Rule(NamedTuple):
    target: tuple[str, ...]      # (collection, *module path, leaf)
    names: tuple[str, ...]       # torch tensor name(s); several = stacked on axis 0
    transform: str               # conv | dense | dense_chw | vector
    chw: tuple[int, int, int] | None
    stacked: bool                # one torch tensor per nn.scan repetition


def get_source(key: str) -> Source:
    """The source of `key`, which may name a timm weight tag (`timm:inception_v3.tf_in1k`)."""
    base, _ = inputs.split_source(key)
    if base not in SOURCES:
        raise ConversionError(
            f"unknown source {key!r}: known sources are {', '.join(SOURCES)}")
    try:
        inputs.convention(key)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return SOURCES[base]


def rules(entries: list[Entry]) -> list[Rule]:
    out = []
    for e in entries:
        for suffix, collection, leaf, transform in LEAVES[e.kind]:
            out.append(Rule((collection, *e.flax, *leaf), tuple(f"{t}.{suffix}" for t in e.torch),
                            transform, e.chw, e.stacked))
    return out


def expected_names(source: Source, aux: bool) -> set[str]:
    return {n for r in rules(source.entries(aux)) for n in r.names}


def has_aux(source: Source, names) -> bool:
    return any(n.startswith(p) for n in names for p in source.aux_prefixes)


def num_classes_of(source: Source, state: Mapping[str, Any]) -> int | None:
    for name in (f"{source.classifier}.weight", f"{source.classifier}.bias"):
        value = state.get(name)
        if isinstance(value, np.ndarray) and value.ndim >= 1:
            return int(value.shape[0])
    return None


def overrides_for(source: Source, num_classes: int, aux: bool) -> dict[str, Any]:
    return {"num_classes": num_classes, "aux_logits": aux, **source.layout}


def target_shapes(model_name: str, overrides: Mapping[str, Any]) -> dict[tuple[str, ...], tuple]:
    """Every variable of the model as {(collection, *path): shape}, without computing it."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from inception_flax import models

    model = models.create_model(model_name, **hashable(overrides))
    size = models.spec(model_name).image_size
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    return {k: tuple(v.shape) for k, v in flatten_dict(
        {c: shapes[c] for c in ("params", "batch_stats") if c in shapes}).items()}


def hashable(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """JSON lists back to tuples (Flax module fields should be hashable)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def torch_shape(transform: str, shape: tuple) -> tuple:
    """The PyTorch shape that `transform` turns into our (per-repeat) `shape`."""
    if transform == "conv":        # (H, W, I, O) <- (O, I, H, W)
        h, w, i, o = shape
        return (o, i, h, w)
    if transform in ("dense", "dense_chw"):  # (in, out) <- (out, in)
        return (shape[1], shape[0])
    return tuple(shape)


def apply_transform(rule: Rule, x: np.ndarray) -> np.ndarray:
    if rule.transform == "conv":
        return np.transpose(x, (2, 3, 1, 0))
    if rule.transform == "dense":
        return np.transpose(x)
    if rule.transform == "dense_chw":
        c, h, w = rule.chw
        out = x.shape[0]
        # torch flattens (c, h, w); our NHWC flatten is (h, w, c).
        return np.transpose(x.reshape(out, c, h, w), (2, 3, 1, 0)).reshape(h * w * c, out)
    return x


def _listed(items: list[str]) -> str:
    head = ", ".join(items[:MAX_LISTED])
    return head + (f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def _guess(names: set[str], exclude: str) -> list[str]:
    """Sources whose tensor names are exactly those of the file."""
    out = []
    for key, src in SOURCES.items():
        if key != exclude and any(names == expected_names(src, aux) for aux in (False, True)):
            out.append(key)
    return out


def convert(source_key: str, state: Mapping[str, Any], origin: str = "the file") -> Converted:
    """Our model name, overrides and variables for `state` (a state dict of `source_key`).

    Fails with one `ConversionError` naming every missing, unexpected and mis-shaped
    tensor; `num_batches_tracked` counters are ignored.
    """
    source = get_source(source_key)
    tagged_key, source_key = source_key, source.key
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    aux = has_aux(source, state)
    num_classes = num_classes_of(source, state) or 1000
    overrides = overrides_for(source, num_classes, aux)
    shapes = target_shapes(source.model, overrides)
    rule_list = rules(source.entries(aux))

    expected = {n for r in rule_list for n in r.names}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    mismatched: list[str] = []
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for rule in rule_list:
        if rule.target not in shapes:  # a bug in the tables, not in the file
            raise ConversionError(f"internal: {source_key} maps onto {'/'.join(rule.target)}, "
                                  f"which {source.model} does not have")
        full = shapes[rule.target]
        per = full[1:] if rule.stacked else full
        if rule.stacked and full[0] != len(rule.names):
            raise ConversionError(f"internal: {'/'.join(rule.target)} stacks {full[0]} blocks, "
                                  f"the table lists {len(rule.names)}")
        want = torch_shape(rule.transform, per)
        arrays = []
        for name in rule.names:
            if name not in state:
                continue
            value = state[name]
            if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
                kind = str(value.dtype) if isinstance(value, np.ndarray) else type(value).__name__
                mismatched.append(f"{name} (not a float tensor: {kind})")
            elif tuple(value.shape) != want:
                mismatched.append(f"{name} {tuple(value.shape)} != expected {want}")
            else:
                arrays.append(apply_transform(rule, value))
        if len(arrays) == len(rule.names):
            flat[rule.target] = np.ascontiguousarray(
                np.stack(arrays) if rule.stacked else arrays[0], dtype=np.float32)

    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_listed(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {len(mismatched)}: {_listed(mismatched)}")
        hint = ""
        if len(missing) > len(expected) // 2:
            guesses = _guess(set(state), source_key)
            if guesses:
                hint = f" (its tensor names are those of {' / '.join(guesses)})"
        message = f"{origin} does not match {source_key}{hint}: " + "; ".join(parts)
        raise ConversionError(message, missing=missing, unexpected=unexpected,
                              mismatched=mismatched)

    unfilled = sorted("/".join(k) for k in set(shapes) - set(flat))
    if unfilled:  # a bug in the tables
        raise ConversionError(f"internal: {source_key} leaves {len(unfilled)} variables of "
                              f"{source.model} unset: {_listed(unfilled)}")
    from flax.traverse_util import unflatten_dict

    return Converted(source.model, overrides, unflatten_dict(flat), source_key, source.config,
                     inputs.convention(tagged_key))
