"""Parts 1 and 2: a recipe's training step and inference, RegionContrast against its baseline."""
import time

import torch

from .recipes import prefill_bank, prepare_cfg
from .stats import compare, interleave, module_bytes, op_trace, peak_step_bytes, resampled_interval


def bench_recipe_blocks(blocks, *args, **kwargs):
    """
    :func:`bench_recipe` ``blocks`` times, each with freshly built models. On a shared 2-core
    machine the median of one block of pairs moved between 1.00 and 1.05 for the same code, more
    than the RC cost itself; the pooled pairs of several blocks, with each block's median next
    to them, show both the estimate and its spread. Inference, memory and the profiled
    breakdown come from the first block; the others time training steps only.
    """
    train, infer = bench_recipe(*args, **kwargs)
    if blocks == 1:
        return train, infer
    runs = [train] + [bench_recipe(*args, train_only=True, **kwargs) for _ in range(blocks - 1)]
    pooled = compare([t for r in runs for t in r["rc_times_s"]],
                     [t for r in runs for t in r["baseline_times_s"]])
    pooled["blocks"] = [{"ratio_median": r["ratio_median"], "overhead_ms": r["overhead_ms"]}
                        for r in runs]
    pooled["ratio_interval_95"] = resampled_interval(
        [[a / b for a, b in zip(r["rc_times_s"], r["baseline_times_s"])] for r in runs])
    if all("phases_s" in r for r in runs):
        pooled["phases_s"] = {k: [p for r in runs for p in r["phases_s"][k]]
                              for k in ("rc", "baseline")}
    pooled["images_per_s"] = {
        "rc": train["batch"] / pooled["rc_s"]["median"],
        "baseline": train["batch"] / pooled["baseline_s"]["median"],
    }
    return {**train, **pooled}, infer


# The profiler ranges of the RC-only forward work, named by :func:`_instrument`.
RC_RANGES = {"criterion_forward": "rc::criterion_forward", "bank_update": "rc::bank_update"}


def _instrument(rc):
    """Names the criterion's forward and its bank update for the profiler; returns an undo."""
    from torch.profiler import record_function

    from region_contrast import find_region_contrast

    criterion = find_region_contrast(rc)
    forward, update = criterion.forward, criterion.update

    def named_forward(*a, **k):
        with record_function(RC_RANGES["criterion_forward"]):
            return forward(*a, **k)

    def named_update(*a, **k):
        with record_function(RC_RANGES["bank_update"]):
            return update(*a, **k)

    criterion.forward, criterion.update = named_forward, named_update

    def undo():
        del criterion.forward
        del criterion.update

    return undo


def rc_breakdown(prof):
    """
    The CPU time of the criterion's forward and of its bank update in one profiled RC step
    (``rc::step``). The backward's and the optimizer's extra time are measured without the
    profiler, as the median pairwise differences of the timed pairs (``phases_s``). CPU only (on
    CUDA these are launch times, not GPU times). Raises if a named range is missing, so a
    renamed method cannot silently report 0.
    """
    totals = {}
    for e in prof.key_averages():
        totals[e.key] = totals.get(e.key, 0.0) + e.cpu_time_total
    missing = [name for name in ("rc::step", *RC_RANGES.values()) if name not in totals]
    if missing:
        raise RuntimeError(f"profiled RC step has no range {missing}: _instrument is stale")
    step = totals["rc::step"]
    parts_us = {key: totals[name] for key, name in RC_RANGES.items()}
    return {
        "step_ms": step / 1000.0,
        "rc_only_ms": {k: v / 1000.0 for k, v in parts_us.items()},
        "rc_only_total_ms": sum(parts_us.values()) / 1000.0,
        "rc_share_of_step": sum(parts_us.values()) / step,
        "method": ("torch.profiler on one RC step (the memory-profiled one): CPU time inside "
                   "the criterion's forward and its bank update. The profiler adds a cost per "
                   "operator, which weighs more on the contrast's small operators than on the "
                   "network's large ones; the target is the interleaved A/B median"),
    }


def same_outputs(a, b):
    """Bitwise equality of two models' outputs for one image: the semantic logits, and for a
    panoptic model its instances (every field) and panoptic segments."""
    from detectron2.structures import Boxes

    if a.keys() != b.keys() or not torch.equal(a["sem_seg"], b["sem_seg"]):
        return False
    if "instances" in a:
        x, y = a["instances"].get_fields(), b["instances"].get_fields()
        if x.keys() != y.keys():
            return False
        for k in x:
            u, v = (x[k].tensor, y[k].tensor) if isinstance(x[k], Boxes) else (x[k], y[k])
            if not torch.equal(u, v):
                return False
    if "panoptic_seg" in a:
        (sa, ia), (sb, ib) = a["panoptic_seg"], b["panoptic_seg"]
        if not torch.equal(sa, sb) or ia != ib:
            return False
    return True


def bench_recipe(name, base_cfg, source, device, *, crop, batch_size, make_batch, amp,
                 warmup, repeats, infer_repeats, seed, train_only=False):
    """
    Parts 1 and 2 for one recipe: (train, inference) dicts; with ``train_only``, only the
    interleaved train-step times (:func:`compare`'s dict), for :func:`bench_recipe_blocks`.
    """
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import DeepLabV3Head
    from region_contrast import find_region_contrast
    from detectron2.utils.events import EventStorage
    from region_contrast.engine.solver import build_optimizer

    rc_cfg = prepare_cfg(base_cfg, device, crop=crop, enabled=True)
    bl_cfg = prepare_cfg(base_cfg, device, crop=crop, enabled=False)
    torch.manual_seed(seed)
    baseline = build_model(bl_cfg)
    torch.manual_seed(seed + 1)
    rc = build_model(rc_cfg)
    incompatible = rc.load_state_dict(baseline.state_dict(), strict=False)
    extra = [k for k in incompatible.missing_keys if ".region_contrast." not in k]
    assert not incompatible.unexpected_keys and not extra, extra
    bank = find_region_contrast(rc).memory_bank
    prefill_bank(bank, seed)
    num_classes = rc_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    # A fixed iteration past the contrast warm-up (and the solver's), so the loss is active.
    it = max(rc_cfg.MODEL.REGION_CONTRAST.WARMUP_ITERS, rc_cfg.SOLVER.WARMUP_ITERS) + 100

    g = torch.Generator().manual_seed(seed + 2)
    batches = [make_batch(batch_size, crop, num_classes, g) for _ in range(2)]

    def make_step(model):
        optimizer = build_optimizer(rc_cfg, model)
        scaler = torch.amp.GradScaler("cuda") if amp else None
        # Forward, backward and optimizer time of every call (on the CPU, where the host's
        # clock is the work's; on CUDA it would be launch time).
        state = {"k": 0, "phases": []}

        def step():
            batch = batches[state["k"] % len(batches)]
            state["k"] += 1
            model.train()
            with EventStorage(it):
                start = time.perf_counter()
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                    losses = model(batch)
                total = sum(losses.values())
                forward = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(total).backward()
                    backward = time.perf_counter()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    total.backward()
                    backward = time.perf_counter()
                    optimizer.step()
                done = time.perf_counter()
            state["phases"].append((forward - start, backward - forward, done - backward))
            state["losses"] = {k: float(v.detach()) for k, v in losses.items()}

        return step, state

    rc_step, rc_state = make_step(rc)
    bl_step, bl_state = make_step(baseline)
    interleave(rc_step, bl_step, warmup, 0, device)

    def timed_pairs():
        result = compare(*interleave(rc_step, bl_step, 0, repeats, device))
        if device.type == "cpu":
            result["phases_s"] = {"rc": rc_state["phases"][-repeats:],
                                  "baseline": bl_state["phases"][-repeats:]}
        return result

    if train_only:
        # The first block's profiled pair also warms up: one more untimed pair here.
        interleave(rc_step, bl_step, 1, 0, device)
        return timed_pairs()
    # After the first steps (optimizer state exists), one profiled pair: also a warm-up pair.
    kept = {}
    undo = _instrument(rc)
    try:
        def named_rc_step():
            from torch.profiler import record_function

            with record_function("rc::step"):
                rc_step()

        mem_rc = peak_step_bytes(named_rc_step, device, keep=kept)
    finally:
        undo()
    mem_bl = peak_step_bytes(bl_step, device)
    breakdown = rc_breakdown(kept.pop("prof")) if "prof" in kept and device.type == "cpu" else None
    train = timed_pairs()
    train["profiled_breakdown"] = breakdown
    train["images_per_s"] = {
        "rc": batch_size / train["rc_s"]["median"],
        "baseline": batch_size / train["baseline_s"]["median"],
    }
    train["rc_losses_last_step"] = rc_state["losses"]
    contrast_active = rc_state["losses"].get("loss_contrast", 0.0) != 0.0
    train["contrast_loss_active"] = contrast_active
    bank_bytes = bank.nbytes
    projector_bytes = module_bytes(find_region_contrast(rc).projector)
    train["memory"] = {
        "rc_step_peak_bytes": mem_rc["peak_bytes"],
        "baseline_step_peak_bytes": mem_bl["peak_bytes"],
        "step_peak_ratio": (mem_rc["peak_bytes"] / mem_bl["peak_bytes"]
                            if mem_rc["peak_bytes"] and mem_bl["peak_bytes"] else None),
        "method": mem_rc["method"],
        "bank_bytes": bank_bytes,
        "projector_bytes": projector_bytes,
        "projector_optimizer_state_bytes": (
            projector_bytes * (2 if "ADAM" in rc_cfg.SOLVER.OPTIMIZER.upper() else 1)),
        "baseline_parameter_bytes": module_bytes(baseline),
        "persistent_extra_bytes": bank_bytes + projector_bytes,
        "note": ("persistent extra = bank + projector (present before and after every step, not "
                 "in the step peak); process peak RSS cannot separate the two interleaved models"
                 if device.type == "cpu" else "persistent extra = bank + projector"),
    }

    # Part 2: the same weights (BN statistics included), eval mode, same inputs.
    rc.load_state_dict(baseline.state_dict(), strict=False)
    bank_before = {k: v.clone() for k, v in bank.state_dict().items()}
    rc.eval()
    baseline.eval()
    infer_batch = [{"image": x["image"], "height": x["height"], "width": x["width"]}
                   for x in batches[0]]

    def infer(model):
        def run():
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.float16,
                                                 enabled=amp):
                return model(infer_batch)
        return run

    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # same algorithms for both models on CUDA
    try:
        # Profiled: the multiset of operators (name and input shapes) each model runs, a
        # load-insensitive check that evaluation executes exactly the baseline's work.
        (out_rc, trace_rc), (out_bl, trace_bl) = op_trace(infer(rc)), op_trace(infer(baseline))
    finally:
        torch.backends.cudnn.deterministic = deterministic
    identical = len(out_rc) == len(out_bl) and all(
        same_outputs(a, b) for a, b in zip(out_rc, out_bl)
    )
    # The two forwards above were the warm-up.
    t_rc, t_bl = interleave(infer(rc), infer(baseline), 0, infer_repeats, device)
    inference = compare(t_rc, t_bl)
    inference["outputs_identical"] = bool(identical)
    inference["same_operators"] = trace_rc is not None and trace_rc == trace_bl
    inference["operators_run"] = {"rc": sum(trace_rc.values()) if trace_rc else None,
                                  "baseline": sum(trace_bl.values()) if trace_bl else None}
    inference["bank_untouched"] = all(
        torch.equal(v, bank_before[k]) for k, v in bank.state_dict().items()
    )
    inference["images_per_s"] = {
        "rc": batch_size / inference["rc_s"]["median"],
        "baseline": batch_size / inference["baseline_s"]["median"],
    }
    inference["parameters_used_at_test"] = {
        "rc": sum(p.numel() for n, p in rc.named_parameters() if ".region_contrast." not in n),
        "baseline": sum(p.numel() for p in baseline.parameters()),
    }
    # The step's feature map: what the contrast machinery pools (for part 3's comparison).
    # DeepLabV3's classifier reads the ASPP output at its input's stride; the other heads' at
    # COMMON_STRIDE.
    stride = rc.backbone.output_shape()[rc_cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES[0]].stride \
        if isinstance(rc.sem_seg_head, DeepLabV3Head) else rc_cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE
    rc_section = rc_cfg.MODEL.REGION_CONTRAST
    common = {
        "recipe": name,
        "source": source,
        "device": device.type,
        "amp": amp,
        "batch": batch_size,
        "crop": list(crop),
        "num_classes": num_classes,
        "bank": {"memory_size": rc_section.MEMORY_SIZE, "dim": bank.dim,
                 "dtype": rc_section.MEMORY_DTYPE,
                 "samples_per_class": rc_section.SAMPLES_PER_CLASS,
                 "fill_fraction": bank.fill_fraction()},
        "storage_iter": it,
        "feature_map": [batch_size, rc.sem_seg_head.predictor.in_channels, crop[0] // stride,
                        crop[1] // stride],
    }
    del rc, baseline
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**common, **train}, {**common, **inference}
