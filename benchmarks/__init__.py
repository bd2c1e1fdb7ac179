"""Speed, compile time and memory of the real training step, optionally next to timm.

`python benchmark.py --model inception_v3 --batch 16 --compare timm` (or
`--config=configs/NET.py` with any `--config.FIELD=VALUE`, as train.py). One job per module:

- `cli`: the flags (train.py's config flags and the benchmark's own) and `main`;
- `run`: what runs, in which order, into the result dictionary `--json` writes;
- `ours`: our side, built by the trainer (`ours.build`): compile (cold and warm),
  train and inference steps, `--ab FIELD=VALUE`, `--memory_sweep`, convolutions alone;
- `torch_side`: the timm / torchvision counterpart, its optimizer, convolutions alone;
- `measure`: timers and medians, peak memory, the matmul rate, the compilation cache;
- `overrides`: `FIELD=VALUE` on a config, parsed as `--config.FIELD=VALUE` is;
- `report`: the printed table.
"""
