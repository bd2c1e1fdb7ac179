"""The training recipe's maths against formulas written here from the papers and TF.

The expected side of every test is plain NumPy (float64), written from the
definitions, never by calling our code:

- TF's RMSProp (`ApplyRMSProp`): ms starts at 1; ms = rho ms + (1 - rho) g^2;
  mom = mu mom + lr g / sqrt(ms + eps) (epsilon inside the root); w -= mom;
- TF's momentum SGD (`ApplyMomentum`): acc = mu acc + g; w -= lr acc;
- the staircase schedule: lr = base t / W during the W warm-up steps, then
  base f^floor((t - W) / D) (the papers: f = 0.94, D = 2 epochs);
- TF's `ExponentialMovingAverage(d, num_updates=global_step)` applied after the
  optimizer's update, which has already counted it: with the state's step t
  before the update, num_updates = t + 1 and decay = min(d, (2 + t) / (11 + t));
- label smoothing: targets (1 - eps) onehot + eps / K;
- the loss: main + w_aux x (each auxiliary head's loss) + wd x sum(kernel^2) / 2
  over convolution and dense kernels only (TF's `l2_loss`), w_aux 0.3 per head
  for GoogLeNet and 0.4 otherwise;
- global-norm clipping at 2.0 of the gradient before the optimizer;
- the gradient of the global batch: the mean of the devices' gradients.

The train step is the real one (`training.step.make_train_step`) on the test's 2
devices, run on a small model whose gradient has a closed form (a scale and bias
named like BatchNorm's, a dense classifier and two dense auxiliary heads), so
the whole recipe is followed in NumPy step by step. A real GoogLeNet and
Inception v3 at a small width check the auxiliary weighting against their own
logits.
"""

from __future__ import annotations

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from inception_flax import optim
from inception_flax.training import mesh as mesh_lib
from inception_flax.training import setup as setup_lib
from inception_flax.training import state as state_lib
from inception_flax.training import step as step_lib
from tests import runs


def load_config(network: str):
    return importlib.import_module(f"configs.{network}").get_config()


# ---- References, from the definitions. ----

def np_lr(t: int, base: float, warmup: int, every: int, factor: float) -> float:
    """Linear warm-up from 0 over `warmup` steps, then x`factor` every `every` steps."""
    if t < warmup:
        return base * t / warmup
    return base * factor ** ((t - warmup) // every)


def np_smoothed_ce(logits: np.ndarray, labels: np.ndarray, eps: float) -> float:
    """Mean over the batch of -sum_k target_k log softmax_k, targets (1-eps) onehot + eps/K."""
    logits = np.asarray(logits, np.float64)
    k = logits.shape[-1]
    targets = (1.0 - eps) * np.eye(k)[labels] + eps / k
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-(targets * log_p).sum(-1).mean())


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_global_norm(tree: dict) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v)) for v in tree.values())))


class NpRMSProp:
    """TF's RMSPropOptimizer with momentum (`ApplyRMSProp`)."""

    def __init__(self, params: dict, rho: float, mu: float, eps: float):
        self.ms = {k: np.ones_like(v) for k, v in params.items()}  # TF: ones initializer
        self.mom = {k: np.zeros_like(v) for k, v in params.items()}
        self.rho, self.mu, self.eps = rho, mu, eps

    def apply(self, params: dict, grads: dict, lr: float) -> dict:
        out = {}
        for k, g in grads.items():
            self.ms[k] = self.rho * self.ms[k] + (1.0 - self.rho) * g * g
            self.mom[k] = self.mu * self.mom[k] + lr * g / np.sqrt(self.ms[k] + self.eps)
            out[k] = params[k] - self.mom[k]
        return out


class NpMomentum:
    """TF's MomentumOptimizer (`ApplyMomentum`, not Nesterov)."""

    def __init__(self, params: dict, mu: float):
        self.acc = {k: np.zeros_like(v) for k, v in params.items()}
        self.mu = mu

    def apply(self, params: dict, grads: dict, lr: float) -> dict:
        out = {}
        for k, g in grads.items():
            self.acc[k] = self.mu * self.acc[k] + g
            out[k] = params[k] - lr * self.acc[k]
        return out


def np_clip(grads: dict, max_norm: float) -> tuple[dict, bool]:
    """TF's clip_by_global_norm: g x max_norm / max(norm, max_norm); and whether it clipped."""
    norm = np_global_norm(grads)
    factor = max_norm / max(norm, max_norm)
    return {k: g * factor for k, g in grads.items()}, norm > max_norm


def flat(tree) -> dict:
    """{'Logits/kernel': array, ...} in float64, from a nested parameter tree."""
    return {"/".join(str(getattr(p, "key", p)) for p in path): np.asarray(x, np.float64)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---- The schedule, the optimizer with clipping, label smoothing, L2. ----

def test_schedule_warms_up_then_decays_x094_every_2_epochs_at_its_boundaries():
    config = load_config("inception_v3")  # warm-up 2 epochs, x0.94 every 2 epochs
    for spe in (10, 7):
        schedule = optim.learning_rate_schedule(config, steps_per_epoch=spe, num_train_steps=10**4)
        warmup, every = 2 * spe, 2 * spe
        boundaries = (warmup, warmup + every, warmup + 2 * every)
        steps = sorted({0, 1, warmup // 2, *(b + d for b in boundaries for d in (-1, 0, 1)),
                        warmup + 10 * every + 3})
        for t in steps:
            expected = np_lr(t, 0.045, warmup, every, 0.94)
            assert float(schedule(t)) == pytest.approx(expected, rel=1e-6, abs=1e-9), (spe, t)
    assert float(schedule(warmup + every)) == pytest.approx(0.045 * 0.94, rel=1e-6)


def tiny_tree(rng: np.random.Generator) -> dict:
    """Every kind of leaf: conv and dense kernels, biases, BN scale and bias."""
    return {"Conv": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4))},
                     "bn": {"scale": rng.uniform(0.5, 1.5, 4), "bias": rng.normal(size=4)}},
            "AuxLogits": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
            "Logits": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)}}


def test_rmsprop_follows_tf_with_the_schedule_and_clipping_before_it():
    config = load_config("inception_v3")
    spe = 2  # warm-up 4 steps, then x0.94 every 4: the learning rate changes as momentum builds
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=spe, num_train_steps=100)
    tx = optim.create_optimizer(config, schedule)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tiny_tree(rng))
    ref = flat(params)
    opt = NpRMSProp(ref, rho=0.9, mu=0.9, eps=1.0)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    clipped = []
    for t in range(12):
        scale = 3.0 if t % 3 == 0 else 0.05  # the global norm above 2.0 every third step
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale,
                                                   jnp.float32), params)
        updates, opt_state = update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        g, was_clipped = np_clip(flat(grads), 2.0)
        clipped.append(was_clipped)
        ref = opt.apply(ref, g, np_lr(t, 0.045, 2 * spe, 2 * spe, 0.94))
        got = flat(params)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=f"{t} {k}")
    assert any(clipped) and not all(clipped)


def test_label_smoothed_cross_entropy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 7)) * 3
    labels = rng.integers(0, 7, 6)
    for eps in (0.0, 0.1, 0.5):
        got = float(step_lib.cross_entropy(jnp.asarray(logits, jnp.float32),
                                           jnp.asarray(labels), eps))
        assert got == pytest.approx(np_smoothed_ce(logits, labels, eps), rel=1e-5), eps


def test_l2_counts_conv_and_dense_kernels_only():
    tree = tiny_tree(np.random.default_rng(2))
    expected = 0.5 * sum(np.sum(tree[a][b]["kernel"] ** 2) if b else np.sum(tree[a]["kernel"] ** 2)
                         for a, b in (("Conv", "conv"), ("AuxLogits", None), ("Logits", None)))
    got = float(optim.l2_loss(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)))
    assert got == pytest.approx(expected, rel=1e-5)


# ---- The real train step on a model whose gradient has a closed form. ----

FEATURES, CLASSES, PER_DEVICE = 6, 5, 3


class Probe(nn.Module):
    """h = x * scale + bias (BatchNorm's names), then a dense classifier and two dense aux heads."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        mean = self.variable("batch_stats", "mean", jnp.zeros, (FEATURES,))
        if train and not self.is_initializing():
            mean.value = x.mean(0)
        scale = self.param("scale", nn.initializers.ones, (FEATURES,))
        bias = self.param("bias", nn.initializers.zeros, (FEATURES,))
        h = x * scale + bias
        if train:
            for name in ("Aux1", "Aux2"):
                self.sow("intermediates", "aux_logits", nn.Dense(CLASSES, name=name)(h))
        return nn.Dense(CLASSES, name="Logits")(h)


def probe_grads(p: dict, x: np.ndarray, labels: np.ndarray, eps: float, w_aux: float,
                wd: float) -> tuple[dict, float, float, float]:
    """One device's (gradient, loss, main loss, sum of aux losses), by hand."""
    n = len(x)
    targets = (1.0 - eps) * np.eye(CLASSES)[labels] + eps / CLASSES
    h = x * p["scale"] + p["bias"]
    g = {}
    z = h @ p["Logits/kernel"] + p["Logits/bias"]
    main = np_smoothed_ce(z, labels, eps)
    dz = (np_softmax(z) - targets) / n
    g["Logits/kernel"], g["Logits/bias"] = h.T @ dz, dz.sum(0)
    dh = dz @ p["Logits/kernel"].T
    aux = 0.0
    for head in ("Aux1", "Aux2"):
        a = h @ p[f"{head}/kernel"] + p[f"{head}/bias"]
        aux += np_smoothed_ce(a, labels, eps)
        da = w_aux * (np_softmax(a) - targets) / n
        g[f"{head}/kernel"], g[f"{head}/bias"] = h.T @ da, da.sum(0)
        dh += da @ p[f"{head}/kernel"].T
    g["scale"], g["bias"] = (dh * x).sum(0), dh.sum(0)
    kernels = [k for k in p if k.endswith("kernel")]
    for k in kernels:
        g[k] = g[k] + wd * p[k]
    l2 = 0.5 * sum(np.sum(p[k] ** 2) for k in kernels)
    return g, main + w_aux * aux + wd * l2, main, aux


def run_probe(network: str, steps: int, spe: int, **fields) -> None:
    """`steps` real train steps on the probe next to the recipe in NumPy; equal at each."""
    config = runs.override(load_config(network), {"weight_decay": 0.05, **fields})
    devices = mesh_lib.create_mesh()
    n_dev = devices.devices.size
    assert n_dev == 2
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=spe, num_train_steps=1000)
    tx = optim.create_optimizer(config, schedule)
    model = Probe()
    variables = model.init(jax.random.key(0), jnp.zeros((1, FEATURES)), train=True)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, jnp.float32),
                          variables["params"])
    state = state_lib.create_state(params, variables["batch_stats"], tx, config.ema_decay > 0,
                                   jax.random.key_data(jax.random.key(0)), devices)
    train_step = step_lib.make_train_step(model, tx, schedule, config, devices, state)

    ref = flat(params)
    ema = prev_ema = dict(ref)
    warmup = round(config.warmup_epochs * spe)
    every = round(config.lr_decay_epochs * spe)
    if config.optimizer == "rmsprop":
        opt = NpRMSProp(ref, config.rmsprop_decay, config.momentum, config.rmsprop_epsilon)
    else:
        opt = NpMomentum(ref, config.momentum)
    clipped = []
    for t in range(steps):
        x = rng.normal(size=(n_dev * PER_DEVICE, FEATURES)) * (4.0 if t % 2 else 0.1)
        labels = rng.integers(0, CLASSES, n_dev * PER_DEVICE)
        batch = jax.device_put({"image": jnp.asarray(x, jnp.float32), "label": jnp.asarray(labels)},
                               NamedSharding(devices, P(mesh_lib.AXIS)))
        state, metrics = train_step(state, batch)

        per_device = [probe_grads(ref, x[d * PER_DEVICE:(d + 1) * PER_DEVICE],
                                  labels[d * PER_DEVICE:(d + 1) * PER_DEVICE],
                                  config.label_smoothing, config.aux_loss_weight,
                                  config.weight_decay) for d in range(n_dev)]
        grads = {k: np.mean([g[k] for g, *_ in per_device], 0) for k in ref}
        lr = np_lr(t, config.learning_rate, warmup, every, config.lr_decay_factor)
        for name, i in (("loss", 1), ("main_loss", 2), ("aux_loss", 3)):
            expected = np.mean([out[i] for out in per_device])
            assert float(metrics[name]) == pytest.approx(expected, rel=1e-5), (t, name)
        assert float(metrics["grad_norm"]) == pytest.approx(np_global_norm(grads), rel=1e-5), t
        assert float(metrics["learning_rate"]) == pytest.approx(lr, rel=1e-6, abs=1e-12), t
        if config.grad_clip_norm > 0:
            grads, was_clipped = np_clip(grads, config.grad_clip_norm)
            clipped.append(was_clipped)
        ref = opt.apply(ref, grads, lr)
        got = flat(state.params)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-6, err_msg=f"{t} {k}")
        if config.ema_decay > 0:
            num_updates = t + 1  # the global step after the optimizer's update counted it
            d = min(config.ema_decay, (1.0 + num_updates) / (10.0 + num_updates))
            ema = {k: d * ema[k] + (1.0 - d) * ref[k] for k in ref}
            got_ema = flat(state.ema_params)
            for k in ref:  # this step's average of the step's own weights, then the chain
                np.testing.assert_allclose(got_ema[k], d * prev_ema[k] + (1.0 - d) * got[k],
                                           rtol=1e-5, atol=1e-7, err_msg=f"ema {t} {k}")
                np.testing.assert_allclose(got_ema[k], ema[k], rtol=1e-4, atol=1e-6,
                                           err_msg=f"ema {t} {k}")
            prev_ema = got_ema
        else:
            assert state.ema_params is None
        stats = np.asarray(state.batch_stats["mean"])  # per device: its own slice's mean
        for d in range(n_dev):
            np.testing.assert_allclose(stats[d], x[d * PER_DEVICE:(d + 1) * PER_DEVICE].mean(0),
                                       rtol=1e-5, atol=1e-6)
    if config.grad_clip_norm > 0:
        assert any(clipped) and not all(clipped)


def test_train_step_follows_the_v3_recipe():
    """RMSProp, warm-up + staircase, clipping at 2.0, label smoothing 0.1, aux 0.4 per head,
    L2 on kernels, TF's moving average, the devices' mean gradient."""
    run_probe("inception_v3", steps=7, spe=2)


def test_train_step_follows_the_googlenet_recipe():
    """Momentum SGD, aux heads weighted 0.3 each, no smoothing, clipping or average."""
    run_probe("inception_v1", steps=5, spe=1, lr_decay_epochs=2.0)




def training_shapes(network: str) -> tuple[dict, tuple]:
    """The paper config's network, initialised in training (shapes only): variables, aux logits."""
    config = load_config(network)
    model = setup_lib.create_model(config, num_classes=CLASSES)
    size = config.image_size
    variables = jax.eval_shape(lambda: model.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)},
        jnp.zeros((2, size, size, 3)), train=True, mutable=True))
    return variables, tuple(variables["intermediates"]["aux_logits"])


@pytest.mark.parametrize("network,heads,weight", [("inception_v1", 2, 0.3),
                                                  ("inception_v3", 1, 0.4)])
def test_each_real_networks_aux_head_is_weighted(network, heads, weight):
    """What the probe's two heads stand for: GoogLeNet's two heads at 0.3 each, one at 0.4 else.

    The step weighs each logits entry the network sows (the probe tests above);
    here each network sows one entry per head; and its L2 term counts exactly
    its weights: its leaves of 2 or more dimensions (biases and BN are vectors).
    """
    config = load_config(network)
    assert config.aux_loss_weight == weight and config.model.aux_logits
    variables, aux = training_shapes(network)
    assert [a.shape for a in aux] == [(2, CLASSES)] * heads

    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                          variables["params"])
    leaves = flat(params)
    assert {k.rsplit("/", 1)[-1] for k in leaves} <= {"kernel", "bias", "scale"}
    assert any(v.ndim == 1 for v in leaves.values())
    expected = 0.5 * sum(np.sum(v ** 2) for v in leaves.values() if v.ndim >= 2)
    assert float(jax.jit(optim.l2_loss)(params)) == pytest.approx(expected, rel=1e-5)
