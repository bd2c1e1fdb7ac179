"""Benchmark a network: `python benchmark.py --model inception_v3 --batch 16 --compare timm`.

Train and inference images/s of the trainer's real step, compile time (cold and
with a warm persistent cache), peak memory, multiply-adds and the fraction of
the measured matmul rate, optionally next to timm, and the input pipeline alone.
The network is a config as for train.py: `--config=configs/NET.py` (or `--model NET`)
and any `--config.FIELD=VALUE`. `python benchmark.py --help` lists the options;
the code is in benchmarks/.
"""

if __name__ == "__main__":  # before JAX is imported: see inception_flax/cpu/process.py
    from inception_flax.cpu import process

    process.prepare()

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
