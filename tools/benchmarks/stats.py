"""Timing, statistics and memory measurement: interleaved A/B pairs, their ratios and intervals."""
import statistics
import time
import warnings

import torch


def summarize(values):
    values = list(values)
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "n": len(values),
    }


def compare(times_rc, times_base):
    """Ratio RC / baseline: median of the per-pair ratios, and ratio of the medians."""
    pairs = [a / b for a, b in zip(times_rc, times_base)]
    rc, base = summarize(times_rc), summarize(times_base)
    return {
        "rc_s": rc,
        "baseline_s": base,
        "ratio_median": statistics.median(pairs),
        "ratio_of_medians": rc["median"] / base["median"],
        "pair_ratios": summarize(pairs),
        "overhead_ms": 1000.0 * (rc["median"] - base["median"]),
        # Relative spread of the baseline alone: the noise floor of this measurement.
        "baseline_spread": (base["max"] - base["min"]) / base["median"],
        "rc_times_s": list(times_rc),
        "baseline_times_s": list(times_base),
    }


def resampled_interval(blocks, level=0.95, resamples=2000, seed=0):
    """
    Interval of the pooled median of per-pair ratios, ``blocks`` a list of each block's pair
    ratios: each resample draws blocks with replacement, then pairs within each drawn block
    (a block's pairs share its machine state, so they are not independent draws).
    """
    import random

    rng = random.Random(seed)
    medians = []
    for _ in range(resamples):
        pooled = []
        for block in (rng.choice(blocks) for _ in blocks):
            pooled.extend(rng.choice(block) for _ in block)
        medians.append(statistics.median(pooled))
    medians.sort()
    tail = (1.0 - level) / 2.0
    return [medians[int(tail * (resamples - 1))], medians[int((1.0 - tail) * (resamples - 1))]]


def phase_extra_ms(phases):
    """Median over pairs of RC's extra forward, backward and optimizer time, in ms."""
    return {
        name: 1000.0 * statistics.median(a[i] - b[i] for a, b in zip(phases["rc"],
                                                                     phases["baseline"]))
        for i, name in enumerate(("forward", "backward", "optimizer"))
    }


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleave(fn_a, fn_b, warmup, repeats, device):
    """
    ``warmup`` untimed pairs, then ``repeats`` timed pairs, interleaved A B B A A B B A ...: the
    order alternates between pairs because the second call of a pair can run a few percent
    slower (seen here in eval-mode forwards of identical code), which ABAB would charge to B.
    Returns both lists of times.
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    _sync(device)
    times_a, times_b = [], []
    for i in range(repeats):
        if i % 2 == 0:
            times_a.append(timed(fn_a, device))
            times_b.append(timed(fn_b, device))
        else:
            times_b.append(timed(fn_b, device))
            times_a.append(timed(fn_a, device))
    return times_a, times_b


def _allocation_events(prof):
    """(time_ns, alloc_size, total_allocated) of every CPU allocation event of ``prof``."""
    out = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and str(fields.device) == "cpu":
            out.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        stack.extend(node.children)
    return out


def peak_step_bytes(fn, device, keep=None):
    """
    Peak bytes allocated while ``fn`` runs, on top of what was allocated before it (None when it
    cannot be measured). CUDA: max_memory_allocated. CPU: torch.profiler allocation events.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - before,
                "peak_bytes_absolute": torch.cuda.max_memory_allocated(device),
                "method": "torch.cuda.max_memory_allocated - memory_allocated before the step"}
    try:
        from torch.profiler import ProfilerActivity, profile

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        events = _allocation_events(prof)
        if keep is not None:
            keep["prof"] = prof
    except Exception as e:  # profiler internals differ across torch versions
        return {"peak_bytes": None, "method": f"torch.profiler unavailable ({e!r})"}
    if not events:
        return {"peak_bytes": None, "method": "torch.profiler recorded no allocation"}
    events.sort()
    # The profiler's running total only counts blocks it saw allocated (and never forgets one
    # freed while it was off), so measure from its value just before the step's first event.
    _, size, total = events[0]
    start = total - size
    return {"peak_bytes": max(t for _, _, t in events) - start,
            "method": "torch.profiler CPU allocation events: peak of the allocator's running "
                      "total during the step, minus its value at the start of the step"}


def module_bytes(module):
    if module is None:
        return 0
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def op_trace(fn):
    """Runs ``fn`` under torch.profiler; returns (its result, Counter of (op, input shapes))."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                out = fn()
    except Exception:  # profiler unavailable: run it plainly, no trace
        return fn(), None
    trace = Counter((e.name, str(e.input_shapes)) for e in prof.events()
                    if e.name.startswith("aten::"))
    return out, trace
