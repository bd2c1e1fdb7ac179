"""The benchmark's report: the result dictionary (what `--json` writes) as a table."""

from __future__ import annotations

from typing import Any


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _value(x: Any) -> str:
    """A config value as it is written on the command line (`--config.FIELD=VALUE`)."""
    return str(x).lower() if isinstance(x, bool) else str(x)


def _kernels(c: dict[str, Any]) -> str:
    """`config.kernels`, and what "auto" chose."""
    chosen, used = c.get("kernels", "?"), c.get("kernels_used")
    return chosen if used in (None, chosen) else f"{chosen} ({used})"


def format_table(r: dict[str, Any]) -> str:
    """The result as the table `benchmark.py` prints."""
    c, m = r["config"], r["model"]
    lines = [
        (f"{c['model']}  batch {c['batch']}  {c['image_size']}x{c['image_size']}  {c['dtype']}  "
        f"depth x{c['depth_multiplier']}  scan_unroll {c['scan_unroll']}  "
        f"aux {_fmt(c['aux_logits'])}  {c['optimizer']}  "
        + (f"grad_accum_steps {c['grad_accum_steps']}  "
           if c.get("grad_accum_steps", 1) > 1 else "") +
        f"{c['devices']} {c['backend']} device(s) ({c.get('device_kind', '?')}), "
        f"{c['cpu_threads']} CPU threads, "
        f"huge-page malloc {'on' if c.get('huge_page_malloc') else 'off'}, "
        f"kernels {_kernels(c)}"),
        (f"params {m['params']:,}   {m['macs_per_image'] / 1e9:.3f} GMACs/image (inference), "
        f"{m['train_forward_macs_per_image'] / 1e9:.3f} with aux heads; train step = 3x forward"),
        f"machine: {r['machine']['matmul_size']}^2 matmul {r['machine']['matmul_gflops']:.1f} "
        f"GFLOP/s (JAX, {c['dtype']})"
        + (f", {r['machine']['torch_matmul_gflops']:.1f} GFLOP/s (PyTorch)"
           if "torch_matmul_gflops" in r["machine"] else ""),
        f"medians of {c['steps']} steps after {c['warmup']} warm-up",
        "",
    ]
    cols = [("ours", r["ours"])] + ([("timm", r["timm"])] if "timm" in r else [])
    rows = [
        ("train images/s", "train_images_per_sec", 1),
        ("train step ms", "train_step_ms", 1),
        ("train GFLOP/s", "train_gflops", 1),
        ("train % of matmul", "train_fraction_of_matmul", None),
        ("inference images/s", "infer_images_per_sec", 1),
        ("inference step ms", "infer_step_ms", 1),
        ("inference % of matmul", "infer_fraction_of_matmul", None),
        ("trace+lower s", "lower_s", 2),
        ("compile cold s", "compile_cold_s", 2),
        ("compile warm cache s", "compile_warm_s", 2),
        ("peak RSS MB (train)", "peak_rss_mb", 0),
        ("page faults/train step", "train_page_faults_per_step", 0),
        ("device peak MB", "device_peak_mb", 0),
        ("XLA temp buffers MB", "xla_temp_mb", 0),
    ]
    head = f"{'':24}" + "".join(f"{n:>14}" for n, _ in cols)
    if "ratio" in r:
        head += f"{'ours/timm':>14}"
    lines.append(head)
    for label, key, digits in rows:
        vals = [d.get(key) for _, d in cols]
        if all(v is None for v in vals):
            continue
        cells = [("-" if v is None else f"{100 * v:.1f}%") if digits is None
                 else _fmt(v, digits) for v in vals]
        line = f"{label:24}" + "".join(f"{s:>14}" for s in cells)
        if key in r.get("ratio", {}):
            line += f"{r['ratio'][key]:>13.2f}x"
        lines.append(line)
    if r["ours"].get("warm_cache_hit") is False:
        lines.append("warning: the warm-cache compile missed the persistent cache")
    if "train_finite" in r["ours"]:
        lines.append(f"ours: last train loss {r['ours']['train_loss']:.4f} "
                     f"({'finite' if r['ours']['train_finite'] else 'NOT FINITE'})")
    for note in r.get("timm", {}).get("notes", []):
        lines.append(f"note: {note}")
    if "conv_layers" in r:
        cl = r["conv_layers"]
        lines += ["", (f"convolutions alone ({cl['convolutions']}, {cl['distinct']} distinct, "
                       f"batch {cl['per_device_batch']}), summed ms:  forward "
                       f"{cl['ours_fwd_ms']:,.0f} ours / {cl['torch_fwd_ms']:,.0f} PyTorch,  "
                       f"backward {cl['ours_bwd_ms']:,.0f} / {cl['torch_bwd_ms']:,.0f}"),
                  "largest differences (ms, ours / PyTorch, times the count):"]
        for row in cl["rows"][:8]:
            lines.append(
                f"  x{row['count']:<3} {'x'.join(map(str, row['input'])):>14} * "
                f"{'x'.join(map(str, row['kernel'])):>13} stride {row['strides'][0]}  "
                f"forward {row['ours_fwd_ms']:7.1f} / {row['torch_fwd_ms']:7.1f}  "
                f"backward {row['ours_bwd_ms']:7.1f} / {row['torch_bwd_ms']:7.1f}")
    if "ab" in r:
        ab = r["ab"]
        lines += ["", (f"A/B in one process, alternating train steps, medians of "
                       f"{len(ab['a_times_ms'])}: {ab['option']}={_value(ab['a'])} "
                       f"{ab['a_step_ms']:,.1f} ms, {ab['option']}={_value(ab['b'])} "
                       f"{ab['b_step_ms']:,.1f} ms per step: {ab['a_over_b']:.3f}")]
    if "memory_sweep" in r:
        lines += ["", "XLA buffers of the train step (MB)   batch  remat      temp  arguments"]
        for m in r["memory_sweep"]:
            lines.append(f"{'':36}{m['batch']:>6}  {_fmt(m['remat']):>5}"
                         f"{m['temp_mb']:>10,.0f}{m['argument_mb']:>11,.0f}")
    if "accum_sweep" in r:
        lines += ["", (f"grad_accum_steps at global batch {c['batch']}:  K  micro-batch"
                       "   temp MB   step ms  images/s")]
        for a in r["accum_sweep"]:
            lines.append(f"{'':36}{a['grad_accum_steps']:>3}{a['micro_batch']:>13}"
                         f"{a['temp_mb']:>10,.0f}{a['step_ms']:>10,.0f}"
                         f"{a['images_per_sec']:>10,.1f}")
    if "pipeline" in r:
        p = r["pipeline"]
        lines += ["", (f"input pipeline ({p['dataset']}:{p['split']}, decoded + augmented): "
                       f"{p['images_per_sec']:,.0f} images/s ({p['batch_ms']:.1f} ms/batch)  "
                       f"-> bound by the {r['bound_by']}")]
    return "\n".join(lines)
