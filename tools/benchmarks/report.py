"""The printed table of a benchmark report, and strict JSON."""
import math

from .common import PIXELS_PER_CLASS
from .stats import phase_extra_ms


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def _ms(s):
    return f"{1000 * s:.1f}"


def _finite(obj):
    """NaN/inf (e.g. a loss with no pairs) as null, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def format_report(r):
    lines = []
    m = r["machine"]
    lines.append(f"commit {m['commit']}; machine: {m['cpu_model']}, {m['cpu_cores']} cores, "
                 f"torch {m['torch_version']}, "
                 f"device {m['device']} ({m['device_name']}), {r['threads']['torch_threads']} "
                 f"torch threads; load average "
                 f"{' '.join(f'{x:.2f}' for x in r['load_average']['before'] or [])} -> "
                 f"{' '.join(f'{x:.2f}' for x in r['load_average']['after'] or [])}"
                 + ("  ** LOADED MACHINE **" if r["load_average"]["loaded"] else ""))
    lines.append("")
    lines.append("1. train step (fwd+bwd+optimizer), RC vs baseline, same weights and batches "
                 "[ms min/median/max]")
    lines.append(f"{'recipe':<12} {'batch x crop':<16} {'RC':<22} {'baseline':<22} "
                 f"{'ratio':>6} {'step peak MiB RC/base':>22} {'bank+proj MiB':>14}")
    for t in r["train_step"]:
        rc, bl, mem = t["rc_s"], t["baseline_s"], t["memory"]
        lines.append(
            f"{t['recipe']:<12} {str(t['batch']) + ' x ' + 'x'.join(map(str, t['crop'])):<16} "
            f"{_ms(rc['min'])}/{_ms(rc['median'])}/{_ms(rc['max']):<8} "
            f"{_ms(bl['min'])}/{_ms(bl['median'])}/{_ms(bl['max']):<8} "
            f"{t['ratio_median']:>6.3f} "
            f"{_mib(mem['rc_step_peak_bytes']) + ' / ' + _mib(mem['baseline_step_peak_bytes']):>22}"
            " "
            f"{_mib(mem['persistent_extra_bytes']):>14}")
    for t in r["train_step"]:
        if t.get("blocks"):
            lines.append(f"   {t['recipe']}: {len(t['rc_times_s'])} pairs pooled from "
                         f"{len(t['blocks'])} blocks (fresh models each); block medians "
                         + ", ".join(f"{b['ratio_median']:.3f}" for b in t["blocks"]))
            if t.get("phases_s"):
                extra = phase_extra_ms(t["phases_s"])
                lines.append(f"   {t['recipe']}: RC's extra time, median over pairs: " + ", ".join(
                    f"{k} {v:+.1f} ms" for k, v in extra.items()))
            if t.get("ratio_interval_95"):
                lo, hi = t["ratio_interval_95"]
                lines.append(f"   {t['recipe']}: pooled median {t['ratio_median']:.3f}, 95% "
                             f"interval {lo:.3f}-{hi:.3f} (resampling blocks, then their pairs)")
    for t in r["train_step"]:
        b = t.get("profiled_breakdown")
        if b:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in b["rc_only_ms"].items())
            lines.append(f"   {t['recipe']}: profiled RC forward {b['rc_only_total_ms']:.1f} ms "
                         f"of {b['step_ms']:.1f} ms under torch.profiler (over-counts small "
                         f"operators; {100 * b['rc_share_of_step']:.1f}%): {parts}")
    lines.append("")
    lines.append("2. inference (eval forward), RC vs baseline [ms median]")
    for t in r["inference"]:
        lines.append(f"{t['recipe']:<12} RC {_ms(t['rc_s']['median'])}  baseline "
                     f"{_ms(t['baseline_s']['median'])}  ratio {t['ratio_median']:.3f}  "
                     f"(noise +-{t['noise']:.3f})  outputs identical: {t['outputs_identical']}  "
                     f"same operators: {t['same_operators']} ({t['operators_run']['rc']} ops)  "
                     f"bank untouched: {t['bank_untouched']}")
    lines.append("")
    lines.append("3. contrast machinery (the criterion: centres + projection + loss, fwd+bwd, "
                 "bank update) vs naive loops [ms median]")
    lines.append(f"{'classes':>7} {'bank':>6} {'sampled':>7} {'mem rows':>8} {'regions':>7} "
                 f"{'criterion':>9} {'naive':>9} {'speedup':>8} {'agree':>6} {'peak MiB c/n':>14} "
                 f"{'% step':>7}")
    for c in r["contrast"]["cases"]:
        lines.append(
            f"{c['num_classes']:>7} {c['bank_size']:>6} "
            f"{(c['samples_per_class'] or 'all'):>7} {c['memory_rows_used']:>8} "
            f"{c['regions']:>7} {_ms(c['fast_s']['median']):>9} {_ms(c['naive_s']['median']):>9} "
            f"{c['speedup_median']:>7.1f}x {str(c['agree']):>6} "
            f"{_mib(c['fast_peak_bytes']) + '/' + _mib(c['naive_peak_bytes']):>14} "
            + ("" if c.get("percent_of_cityscapes_step_scaled") is None
               else f"{c['percent_of_cityscapes_step_scaled']:>6.2f}%"))
    ref = r["contrast"].get("cityscapes_step_reference")
    if ref:
        lines.append(f"   % step: criterion time / Cityscapes baseline step of part 1 "
                     f"({_ms(ref['baseline_step_s'])} ms at {ref['feature_map']}) scaled to the "
                     f"case's feature pixels (x{ref['scale']:.1f}); unscaled in the JSON")
    lines.append("")
    lines.append(f"4. bank memory (MiB) vs a pixel memory of {PIXELS_PER_CLASS} px/class")
    lines.append(f"{'recipe':<72} {'C':>4} {'size':>6} {'D':>4} {'fp32':>8} {'fp16':>8} "
                 f"{'pixel fp32':>10}")
    for row in r["memory"]:
        if "error" not in row and (row["base_file"] or not row["region_contrast_enabled"]):
            continue  # baselines and Base-* files: in the JSON only
        if "error" in row:
            lines.append(f"{row['recipe']:<72} error: {row['error']}")
            continue
        lines.append(f"{row['recipe'][:72]:<72} {row['num_classes']:>4} {row['memory_size']:>6} "
                     f"{row['dim']:>4} {_mib(row['bank_bytes_fp32']):>8} "
                     f"{_mib(row['bank_bytes_fp16']):>8} "
                     f"{_mib(row['pixel_memory_bytes_fp32']):>10}")
    if r.get("gpu"):
        lines.append("")
        lines.append(f"5. GPU ({r['gpu']['device_name']}), AMP, full crop")
        for g in r["gpu"]["recipes"]:
            lines.append(f"{g['recipe']:<12} {g['batch']} x {'x'.join(map(str, g['crop']))}  "
                         f"img/s RC {g['images_per_s']['rc']:.2f} baseline "
                         f"{g['images_per_s']['baseline']:.2f}  ratio {g['ratio_median']:.3f}  "
                         f"peak MiB RC {_mib(g['memory']['rc_step_peak_bytes'])} baseline "
                         f"{_mib(g['memory']['baseline_step_peak_bytes'])}")
    lines.append("")
    lines.append("targets:")
    for k, v in r["targets"].items():
        verdict = ("no target on this device" if v["met"] is None
                   else "met" if v["met"] else "MISSED")
        lines.append(f"  {k}: {v['value']} -> {verdict}")
    return "\n".join(lines)
