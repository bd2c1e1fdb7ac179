"""`python -m inception_flax.export --checkpoint DIR --out OUT [options]`."""

from __future__ import annotations

import argparse
import sys

from inception_flax.export.core import FORMATS


def batch_size(text: str) -> int | None:
    if text == "polymorphic":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is neither a positive batch size nor "
                                     "'polymorphic'")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m inception_flax.export",
        description="Export a run's or converted network for serving: a TensorFlow "
                    "SavedModel or a serialized jax.export (StableHLO) artifact.")
    p.add_argument("--checkpoint", required=True, help="a run's workdir or converted weights")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--format", default="savedmodel", choices=FORMATS)
    p.add_argument("--batch-size", type=batch_size, default=None, metavar="N|polymorphic",
                   help="the batch the artifact takes (default: polymorphic, any)")
    p.add_argument("--softmax", action="store_true", help="also return probabilities")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="also return the K most probable classes")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default: the network's own)")
    p.add_argument("--platforms", default=None,
                   help="comma-separated, e.g. cpu,cuda (default: this machine's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: bad input, in one `error:` line)."""
    from inception_flax import inference
    from inception_flax.export.core import export_network

    try:
        args = parser().parse_args(argv)
        network = inference.load(args.checkpoint, args.image_size)
        if not 0 <= args.top_k <= len(network.labels):
            raise inference.InputError(f"--top-k={args.top_k}: give 0 to "
                                       f"{len(network.labels)} (the network's classes)")
        platforms = tuple(args.platforms.split(",")) if args.platforms else None
        out = export_network(network, args.out, args.format, args.batch_size, args.softmax,
                             args.top_k, platforms, args.checkpoint, args.overwrite)
    except SystemExit as e:  # argparse: usage error (2) or --help (0)
        return int(e.code or 0)
    except (inference.InputError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch = "any batch" if args.batch_size is None else f"batch {args.batch_size}"
    size = network.input.image_size
    print(f"wrote {out}: {args.format} of {network.name} (step {network.step}"
          f"{', moving average' if network.moving_average else ''}), {batch} of "
          f"{size}x{size}x3 float32 images")
    return 0
