"""Training and evaluation of the Inception networks, data parallel over every device.

Which module holds what:
- `setup`: the one setup of a run, used by the trainer, the evaluator and the
  benchmark: config checks, kernel choice, data info, model, mesh, optimizer and
  initial state (`setup(config) -> Setup`).
- `checks`: `ConfigError` / `NonFiniteError` and the config checks that run before
  anything compiles (`check_config`, `check_devices`, `durations`).
- `mesh`: the 1-D device mesh and its axis name, `AXIS`.
- `state`: `TrainState`, its sharding, creation, checkpoint view and BN
  statistics' reconciliation.
- `step`: the losses, the data-parallel train step and the eval step.
- `evaluate`: evaluation over a split; `evaluate_checkpoint` for eval.py.
- `loop`: `train_and_evaluate` for train.py: resume, log, checkpoint, evaluate,
  preemption.

Input batches come from `inception_flax.data` (`pipeline`, `sharding`, `info`),
checkpoints' files from `inception_flax.checkpoint`, optimizers from
`inception_flax.optim`, pretrained weights from `inception_flax.pretrained`.
"""
