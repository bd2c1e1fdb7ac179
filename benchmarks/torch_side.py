"""The PyTorch counterpart: the same network in timm / torchvision, trained and timed alike.

Same batch, image size, thread count and optimizer as ours, channels-last, train
mode, the loss with the aux head where the PyTorch model has one; on CUDA when
JAX runs on a GPU. Also one convolution alone (`time_conv`) and the matmul rate.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from typing import Any

import ml_collections

from benchmarks import measure

# The PyTorch counterpart of each network: (library, constructor name, has aux head).
TORCH_MODELS = {
    "inception_v1": ("torchvision", "googlenet", True),
    "inception_v3": ("timm", "inception_v3", True),
    "inception_v4": ("timm", "inception_v4", False),
    "inception_resnet_v2": ("timm", "inception_resnet_v2", False),
}


def check_counterpart(name: str) -> None:
    if name not in TORCH_MODELS:
        raise ValueError(f"--compare timm: no timm / torchvision counterpart of {name}; "
                         f"choose one of {', '.join(TORCH_MODELS)}")


def import_torch_stack() -> None:
    """Import PyTorch, torchvision and timm; it must happen before TensorFlow loads.

    torchvision pulls in triton, whose import crashes the process (SIGSEGV)
    once TensorFlow's shared libraries are loaded; the other order is fine.
    """
    if "torchvision" in sys.modules and "timm" in sys.modules:
        return
    if "tensorflow" in sys.modules and "triton" not in sys.modules:
        raise RuntimeError(
            "--compare timm: import torch, torchvision and timm before TensorFlow (triton "
            "crashes when loaded after it); run benchmark.py, or call "
            "benchmarks.torch_side.import_torch_stack() first")
    import timm
    import timm.optim
    import timm.utils  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401


def device() -> str:
    """PyTorch's side runs where JAX's does: CUDA when JAX runs on a GPU (with
    `cudnn.benchmark` on, as timm's train.py: the fastest algorithms)."""
    import jax
    import torch
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return "cuda"
    return "cpu"


def _timed(fn: Callable[[], Any], device: str) -> Callable[[], None]:
    """`fn`, then wait for the device: CUDA kernels run asynchronously."""
    import torch
    if device == "cpu":
        return fn

    def timed():
        fn()
        torch.cuda.synchronize()
    return timed


def matmul_gflops(n: int, dtype: str, steps: int = 5, device: str = "cpu") -> float:
    """Measured dense (n x n) @ (n x n) rate of PyTorch, GFLOP/s."""
    import torch
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a = torch.randn(n, n, device=device).to(tdtype)
    b = torch.randn(n, n, device=device).to(tdtype)
    times = measure.step_times(_timed(lambda: torch.mm(a, b), device), steps, 1)
    return 2 * n**3 / statistics.median(times) / 1e9


def build_model(name: str, config: ml_collections.ConfigDict, num_classes: int, aux: bool):
    library, ctor, _ = TORCH_MODELS[name]
    if library == "torchvision":
        import torchvision
        return getattr(torchvision.models, ctor)(
            weights=None, num_classes=num_classes, aux_logits=aux, init_weights=True,
            transform_input=False, dropout=config.model.dropout_rate,
            dropout_aux=config.model.get("aux_dropout_rate", 0.7))
    import timm
    kwargs = {"aux_logits": True} if aux else {}
    return timm.create_model(ctor, pretrained=False, num_classes=num_classes,
                             drop_rate=config.model.dropout_rate, **kwargs)


def optimizer(config: ml_collections.ConfigDict, params):
    """The config's optimizer in PyTorch (RMSProp: timm's TF-style variant)."""
    import torch
    lr, wd = config.learning_rate, config.weight_decay
    if config.optimizer == "rmsprop":
        from timm.optim import RMSpropTF
        return RMSpropTF(params, lr=lr, alpha=config.rmsprop_decay, eps=config.rmsprop_epsilon,
                         momentum=config.momentum, weight_decay=wd)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def bench(config: ml_collections.ConfigDict, num_classes: int, flops: dict[str, float],
          steps: int, warmup: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    """Train and inference steps of the PyTorch counterpart of `config.model.name`."""
    import torch
    import torch.nn.functional as F

    from inception_flax import models

    name = models.canonical_name(config.model.name)
    check_counterpart(name)
    library, ctor, torch_has_aux = TORCH_MODELS[name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours_aux = bool(config.model.aux_logits)
    aux = ours_aux and torch_has_aux
    size, batch = config.image_size, config.batch_size
    x = torch.rand(batch, 3, size, size, device=device).mul_(2).sub_(1).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    notes = []
    model = build_model(name, config, num_classes, aux).to(device)
    if aux:  # timm's v3 aux head pools 5x5 with no padding: small images cannot run it
        try:
            with torch.no_grad():
                model.train()(x)
        except RuntimeError:
            aux = False
            notes.append(f"{library}'s {ctor} auxiliary head cannot run at {size}x{size}: "
                         "it is left out there, ours trains it")
            model = build_model(name, config, num_classes, aux).to(device)
    model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = optimizer(config, model.parameters())
    ema = None
    if config.ema_decay > 0:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=config.ema_decay)
    bf16 = config.model.dtype == "bfloat16"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    smoothing, aux_weight = config.label_smoothing, config.aux_loss_weight

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
            if aux:  # timm: (logits, aux); torchvision: (logits, aux2, aux1)
                logits, heads = out[0], tuple(out[1:])
            else:
                logits, heads = out, ()
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
            for h in heads:
                loss = loss + aux_weight * F.cross_entropy(h.float(), y,
                                                           label_smoothing=smoothing)
        loss.backward()
        if config.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        opt.step()
        if ema is not None:
            ema.update(model)

    out: dict[str, Any] = {
        "library": library, "model": ctor, "device": device, "threads": threads,
        "torch": torch.__version__, "aux_logits": aux,
        "channels_last": True, "optimizer": type(opt).__name__, "ema": ema is not None}
    if ours_aux and not torch_has_aux:
        notes.append(f"{library}'s {ctor} has no auxiliary head: ours trains one, it does not "
                     "(--config.model.aux_logits=false for like-for-like)")
    if config.model.depth_multiplier != 1.0:
        notes.append(f"{library}'s {ctor} has full width; ours has depth_multiplier "
                     f"{config.model.depth_multiplier}: the ratio is not like-for-like")
    out["notes"] = notes
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with measure.PeakRss() as rss:
        times = measure.step_times(_timed(train_step, device), steps, warmup)
    out.update(measure.rates(times, batch, flops["train"], "train"))
    out.update(rss.report(steps + warmup))
    if device == "cuda":
        out["device_peak_mb"] = measure.mb(torch.cuda.max_memory_allocated())

    model.eval()

    def infer_step():
        with torch.inference_mode(), autocast:
            model(x)

    times = measure.step_times(_timed(infer_step, device), steps, warmup)
    out.update(measure.rates(times, batch, flops["infer"], "infer"))
    return out


def time_conv(arrays: dict[str, Any], c: dict[str, Any], dtype: str, steps: int, warmup: int,
              device: str = "cpu") -> dict[str, float]:
    """Median ms of one convolution alone, forward and backward, as `nn.Conv2d` in
    channels-last. `arrays`: NHWC input `x`, HWIO kernel `w` (unused: PyTorch's own
    initialisation times alike), output gradient `g` (numpy)."""
    import numpy as np
    import torch

    (kh, kw, cin, cout), strides = c["kernel"], tuple(c["strides"])
    (top, bottom), (left, right) = c["padding"]
    image = cin == 3  # the network's input needs no gradient
    tdtype = getattr(torch, dtype)

    def nchw(a):
        t = torch.from_numpy(np.asarray(a, np.float32)).permute(0, 3, 1, 2)
        return t.to(device=device, dtype=tdtype)
    x = torch.nn.functional.pad(nchw(arrays["x"]), (left, right, top, bottom))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(not image)
    g = nchw(arrays["g"]).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(cin, cout, (kh, kw), stride=strides, bias=False).to(
        device=device, dtype=tdtype, memory_format=torch.channels_last)
    out = conv(x)
    wrt = [conv.weight] if image else [x, conv.weight]

    def forward():
        with torch.no_grad():
            return conv(x)

    timed = {"torch_fwd_ms": _timed(forward, device),
             "torch_bwd_ms": _timed(
                 lambda: torch.autograd.grad(out, wrt, g, retain_graph=True), device)}
    return {k: 1e3 * statistics.median(measure.step_times(fn, steps, max(warmup, 1)))
            for k, fn in timed.items()}
