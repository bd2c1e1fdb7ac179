"""Read a PyTorch state dict from `.safetensors` (no PyTorch needed) or `.pth` / `.pt`."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
NESTING_KEYS = ("state_dict", "model")  # training checkpoints wrap the state dict
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


class ConversionError(ValueError):
    """A weights file that cannot be converted; the message is one line.

    `missing`, `unexpected` and `mismatched` name the offending tensors (if any).
    """

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """`{name: numpy array}` of the file, unwrapped and de-prefixed.

    Floating tensors become float32; other values are kept as they are (the
    converter ignores `num_batches_tracked` and reports anything else it does not use).
    """
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"weights file not found: {path}")
    if not p.is_file():
        raise ConversionError(f"weights path is not a file: {path}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        raw = _read_safetensors(p)
    elif suffix in TORCH_SUFFIXES:
        raw = _read_torch(p)
    else:
        raise ConversionError(
            f"{path}: unknown weights format {suffix or '(no suffix)'!r}: "
            f"expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}")
    return _clean(raw, p)


def _read_safetensors(p: Path) -> Mapping[str, Any]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(p))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ConversionError(f"{p}: not a readable .safetensors file: {_first_line(e)}") from e


def _read_torch(p: Path) -> Any:
    try:
        import torch  # lazily: only .pth / .pt files need PyTorch
    except ImportError as e:
        raise ConversionError(
            f"{p}: reading {p.suffix} files needs PyTorch; install it or convert the "
            "file to .safetensors") from e
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{p}: refused: the file pickles objects other than tensors and plain containers "
            f"(read with weights_only=True){_unsupported(e)}; save the state dict alone, "
            "or as .safetensors") from e
    except Exception as e:  # noqa: BLE001 - truncated / not a torch file
        raise ConversionError(f"{p}: not a readable PyTorch checkpoint: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # terminal colour codes
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _unsupported(e: BaseException) -> str:
    """The class torch refused, if its message names one."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    return f": {match.group(1)}" if match else ""


def _unwrap(obj: Any) -> Any:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in NESTING_KEYS
                      if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _to_numpy(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        t = value.detach().cpu()
        if t.is_floating_point():
            return t.float().numpy()
        return t.numpy()
    return value


def _clean(raw: Any, p: Path) -> dict[str, Any]:
    state = _unwrap(raw)
    if not isinstance(state, Mapping):
        raise ConversionError(f"{p}: holds a {type(state).__name__}, not a state dict")
    out: dict[str, Any] = {}
    for key, value in state.items():
        name = _strip(str(key))
        if name in out:
            raise ConversionError(f"{p}: tensor {name!r} appears twice (with and without a prefix)")
        out[name] = _to_numpy(value)
    return out
