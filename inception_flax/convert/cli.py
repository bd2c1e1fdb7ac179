"""`python -m inception_flax.convert --source SRC --weights FILE --out DIR`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from inception_flax.convert.core import convert, get_source
from inception_flax.convert.reader import ConversionError, read_state_dict
from inception_flax.convert.sources import SOURCES
from inception_flax.convert.store import save

# Overrides that fix the layout, as the trainer's --config.model.* flags.
LAYOUT_FLAGS = ("layout", "pool_include_pad", "aux_logits", "bn_epsilon")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m inception_flax.convert",
        description="Convert timm / torchvision Inception weights to an inception_flax "
                    "checkpoint directory (model.json + orbax variables/).")
    p.add_argument("--source", required=True, help=f"one of {', '.join(SOURCES)}; a timm weight tag may follow "
                        "a dot (timm:inception_v3.gluon_in1k), for its input convention")
    p.add_argument("--weights", required=True,
                   help="the state dict: .safetensors (no PyTorch needed) or .pth / .pt")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def run(args: argparse.Namespace) -> None:
    get_source(args.source)  # unknown sources fail before anything is read
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConversionError(f"{out} already exists (pass --overwrite to replace it)")
    state = read_state_dict(args.weights)
    result = convert(args.source, state, origin=str(args.weights))
    path = save(out, result.model, result.overrides, result.variables,
                source=result.source, config=result.config, convention=result.input,
                overwrite=args.overwrite)
    o = result.overrides
    flags = " ".join(f"--config.model.{k}={o[k]}" for k in LAYOUT_FLAGS if k in o)
    print(f"wrote {path}: {result.model} {json.dumps(o)} from {args.source}")
    heads = "no aux head" if not o["aux_logits"] else (
        "aux heads" if result.model == "inception_v1" else "aux head")
    print(f"config: {result.config} (num_classes={o['num_classes']}, {heads})")
    print(f"train with: --config={result.config} --config.init_from={path} {flags}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse: usage error (2) or --help (0)
        return int(e.code or 0)
    try:
        run(args)
    except (ConversionError, OSError) as e:  # bad input, or the output cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
