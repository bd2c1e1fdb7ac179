"""TEMPORARY STUB (branch C): helper A's `inception_flax/kernels.py` replaces it at merge.

It has A's API so that the trainer's setup can be written against it: `CHOICES`,
`check(choice)` (ValueError, one line) and `resolve(choice)`, which here returns
None (the layers still choose their kernels themselves on this branch).
"""

from __future__ import annotations

from typing import Any

CHOICES = ("auto", "native", "xla_cpu", "plain")


def check(choice: str) -> None:
    """Raises ValueError (one line) unless `choice` is one of `CHOICES`."""
    if choice not in CHOICES:
        raise ValueError(f"kernels={choice!r} is not a kernel choice: use one of "
                         f"{', '.join(CHOICES)}")


def resolve(choice: str) -> Any:
    """The ops of `choice` (A's: `models.ops.Ops`); None in this stub.

    "native" that cannot be built is a ValueError (one line), as the trainer's
    checks expect.
    """
    check(choice)
    if choice == "native":
        from inception_flax import onednn
        reason = onednn.unavailable_reason()
        if reason is not None:
            raise ValueError(f"kernels=native: {reason} (or set --config.kernels=xla_cpu)")
    return None
