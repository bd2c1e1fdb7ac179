"""`python -m inception_flax.models NAME`: per-block parameters, multiply-adds, shapes."""

from __future__ import annotations

import argparse
import json
import sys

from inception_flax import models
from inception_flax.models.summary import summarize


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m inception_flax.models", description=__doc__)
    p.add_argument("name", help=f"one of {', '.join(sorted([*models.MODELS, *models.ALIASES]))}")
    p.add_argument("--image-size", type=int, default=None,
                   help="input resolution (default: the network's canonical size)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--aux-logits", action="store_true", help="include the auxiliary head(s)")
    p.add_argument("--layout", choices=["paper", "torchvision"], default=None,
                   help="GoogLeNet only: true 5x5 branches (paper) or 3x3 (torchvision)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with params, macs, output_shape")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {"num_classes": args.num_classes, "aux_logits": args.aux_logits}
    if args.layout is not None:
        overrides["layout"] = args.layout
    try:
        model = models.create_model(args.name, **overrides)
        size = args.image_size or models.spec(args.name).image_size
        model.check_image_size(size, size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(model, size)
    if args.json:
        print(json.dumps(summary.as_dict()))
        return 0
    print(f"{models.canonical_name(args.name)} at {size}x{size}, {args.num_classes} classes"
          f"{', aux heads' if args.aux_logits else ''}")
    print(f"{'block':<24}{'params':>14}{'MMACs':>12}  output")
    for r in summary.rows:
        shape = "x".join(map(str, r.output_shape[1:])) if r.output_shape else "-"
        print(f"{r.block:<24}{r.params:>14,}{r.macs / 1e6:>12.1f}  {shape}")
    print(f"{'total':<24}{summary.params:>14,}{summary.macs / 1e6:>12.1f}  "
          f"{'x'.join(map(str, summary.output_shape[1:]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
