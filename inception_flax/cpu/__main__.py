"""`python -m inception_flax.cpu build`: build the native CPU kernels ahead of time.

Prints where the library is cached; exit status 0 when it is built (or was already),
1 with the reason when it cannot be.
"""

from __future__ import annotations

import argparse
import sys

from absl import logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inception_flax.cpu", description=__doc__)
    p.add_argument("command", choices=["build"],
                   help="build: compile and cache the native kernels (native/*.cc)")
    p.parse_args(argv)
    from inception_flax.cpu import native

    logging.set_verbosity(logging.INFO)
    try:
        path = native.load()
    except native.Unavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
