"""Part 3: the contrast machinery alone, against the naive per-class loops of the authors'
approach."""
import statistics

import torch

from .recipes import prefill_bank
from .stats import interleave, peak_step_bytes, summarize


def naive_region_centers(features, labels, num_classes, ignore_value=255):
    """The authors' approach: loop over images and classes, pool with boolean masks."""
    centers, classes = [], []
    # One view per image (unbind): indexing features[i] inside the loop would make autograd
    # build a full-size gradient for every region, a cost of autograd, not of the loops.
    for i, image_features in enumerate(features.unbind(0)):
        for c in range(num_classes):
            mask = labels[i] == c
            if mask.sum() > 0:
                centers.append(image_features[:, mask].mean(dim=1))
                classes.append(c)
    return torch.stack(centers), torch.tensor(classes, device=features.device)


def naive_read_bank(bank, per_class):
    """Per class: the filled slots, or ``per_class`` of them at random."""
    rows, classes = [], []
    for c in range(bank.num_classes):
        filled = bank.features[c, : int(bank.count[c])]
        if 0 < per_class < filled.shape[0]:
            filled = filled[torch.randperm(filled.shape[0], device=filled.device)[:per_class]]
        rows.append(filled.float())
        classes.append(torch.full((filled.shape[0],), c, dtype=torch.long, device=filled.device))
    return torch.cat(rows), torch.cat(classes)


def naive_contrast_loss(anchors, anchor_classes, memory, memory_classes, temperature):
    """Loop over classes: each class's anchors against its positives and the other classes."""
    total = anchors.new_zeros(())
    count = 0
    for c in torch.unique(anchor_classes).tolist():
        a = anchors[anchor_classes == c]
        pos = memory[memory_classes == c]
        neg = memory[memory_classes != c]
        if pos.shape[0] == 0 or neg.shape[0] == 0:
            continue
        pos_logits = a @ pos.t() / temperature  # (A_c, P)
        neg_logits = a @ neg.t() / temperature  # (A_c, N)
        log_neg = torch.logsumexp(neg_logits, dim=1, keepdim=True)
        # -log(exp(l_p) / (exp(l_p) + sum_n exp(l_n))), averaged over the positives
        per_anchor = (torch.logaddexp(pos_logits, log_neg) - pos_logits).mean(dim=1)
        total = total + per_anchor.sum()
        count += a.shape[0]
    if count == 0:
        return anchors.sum() * 0.0
    return total / count


def naive_push(bank, rows, classes):
    """One row at a time, each at its class's write pointer."""
    for row, c in zip(rows.detach(), classes.tolist()):
        p = int(bank.ptr[c])
        bank.features[c, p] = row.to(bank.features.dtype)
        bank.ptr[c] = (p + 1) % bank.size
        bank.count[c] = min(int(bank.count[c]) + 1, bank.size)


def contrast_inputs(num_images, dim, h, w, num_classes, regions_per_image, seed, device):
    """Decoder-like features and labels at the feature resolution, ~regions_per_image each."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(num_images, dim, h, w, generator=g)
    labels = torch.empty(num_images, h, w, dtype=torch.long)
    cell = 8
    while cell > 1 and (h // cell) * (w // cell) < 2 * regions_per_image:
        cell //= 2
    gh, gw = max(1, h // cell), max(1, w // cell)
    for i in range(num_images):
        present = torch.randperm(num_classes, generator=g)[:regions_per_image]
        coarse = present[torch.randint(0, present.numel(), (gh, gw), generator=g)]
        coarse.view(-1)[: present.numel()] = present  # every chosen class appears
        up = coarse.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:h, :w]
        labels[i] = torch.nn.functional.pad(up, (0, w - up.shape[1], 0, h - up.shape[0]),
                                            value=255)
    labels[torch.rand(num_images, h, w, generator=g) < 0.03] = 255
    return features.to(device).requires_grad_(True), labels.to(device)


def bench_contrast_case(num_classes, bank_size, samples_per_class, sizes, device, warmup,
                        repeats, seed):
    """
    One part-3 case: the criterion's forward, backward and bank update ("fast": the code that
    trains) against the naive loops, interleaved, on the same features, labels and projector;
    with their peak memory and whether they agree.

    Agreement is checked where the computation is smooth, so float32 rounding cannot flip it:
    the region centres (a mean), the loss, and its gradient with respect to the anchors, each
    against a float64 evaluation. (Checked through the projection head instead, a ReLU input
    within rounding of 0 can switch between the float32 and float64 paths and move a gradient
    by far more than rounding.)
    """
    import torch.nn.functional as F
    from region_contrast.modeling.criterion import RegionContrastCriterion
    from region_contrast.modeling.loss import region_contrast_loss
    from region_contrast.modeling.regions import region_centers

    n, d, h, w = sizes["images"], sizes["dim"], sizes["h"], sizes["w"]
    regions_per_image = min(sizes["regions_per_image"], max(1, int(0.8 * num_classes)))
    features, labels = contrast_inputs(n, d, h, w, num_classes, regions_per_image, seed, device)
    torch.manual_seed(seed)
    t = 0.1
    criterion = RegionContrastCriterion(
        num_classes=num_classes, embedding_dim=d, proj_dim=d, memory_size=bank_size,
        temperature=t, loss_weight=1.0, samples_per_class=samples_per_class,
    ).to(device)
    projector, bank = criterion.projector, criterion.memory_bank
    prefill_bank(bank, seed)

    def zero():
        features.grad = None
        for p in projector.parameters():
            p.grad = None

    def fast():
        zero()
        out = criterion(features, labels)
        out.loss.backward()
        criterion.update(out)

    def naive_forward(memory, memory_classes):
        centers, classes = naive_region_centers(features, labels, num_classes)
        emb = F.normalize(projector(centers), dim=1)
        return naive_contrast_loss(emb, classes, memory, memory_classes, t), emb, classes

    def naive():
        zero()
        loss, emb, classes = naive_forward(*naive_read_bank(bank, samples_per_class))
        loss.backward()
        naive_push(bank, emb, classes)

    # Agreement, on one memory snapshot: centres, then the loss and its anchor gradient.
    memory, memory_classes = bank.sample(samples_per_class)
    with torch.no_grad():
        centers, classes, _ = region_centers(features, labels, num_classes)
        naive_centers, naive_classes = naive_region_centers(features, labels, num_classes)
        centers64, classes64, _ = region_centers(features.double(), labels, num_classes)
        # One set of anchors for all three evaluations (float64 gets its exact copy).
        anchors = F.normalize(projector(centers), dim=1)

    def loss_and_grad(loss_fn, dtype):
        a = anchors.detach().to(dtype).requires_grad_(True)
        loss = loss_fn(a, classes, memory.to(dtype), memory_classes, t)
        loss.backward()
        return loss.detach().double(), a.grad.double()

    loss_fast, grad_fast = loss_and_grad(region_contrast_loss, torch.float32)
    loss_naive, grad_naive = loss_and_grad(naive_contrast_loss, torch.float32)
    loss64, grad64 = loss_and_grad(region_contrast_loss, torch.float64)

    def rel_err(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))

    agreement = {
        "same_regions": bool(torch.equal(classes, naive_classes)
                             and torch.equal(classes, classes64)),
        "centers_rel_err_fast_vs_float64": rel_err(centers, centers64),
        "centers_rel_err_naive_vs_float64": rel_err(naive_centers, centers64),
        "loss_fast": float(loss_fast),
        "loss_naive": float(loss_naive),
        "loss_float64": float(loss64),
        "anchor_grad_rel_err_fast_vs_float64": rel_err(grad_fast, grad64),
        "anchor_grad_rel_err_naive_vs_float64": rel_err(grad_naive, grad64),
    }
    # float32 against float64: rounding, summed over up to 190,000 memory rows.
    agreement["loss_allclose"] = bool(torch.allclose(loss_fast, loss64, rtol=1e-4, atol=1e-6)
                                      and torch.allclose(loss_naive, loss64, rtol=1e-4, atol=1e-6))
    agreement["agree"] = bool(
        agreement["same_regions"] and agreement["loss_allclose"]
        and max(agreement["centers_rel_err_fast_vs_float64"],
                agreement["centers_rel_err_naive_vs_float64"]) <= 1e-5
        and max(agreement["anchor_grad_rel_err_fast_vs_float64"],
                agreement["anchor_grad_rel_err_naive_vs_float64"]) <= 1e-3
    )

    # Peak memory of one forward+backward each, without the bank update (these are also the
    # warm-up of the timing below).
    def without_push(run_loss):
        def run():
            zero()
            run_loss().backward()
        return run

    mem_fast = peak_step_bytes(without_push(lambda: criterion(features, labels).loss), device)
    mem_naive = peak_step_bytes(
        without_push(lambda: naive_forward(memory, memory_classes)[0]), device)

    t_fast, t_naive = interleave(fast, naive, warmup, repeats, device)
    fast_s, naive_s = summarize(t_fast), summarize(t_naive)
    pairs = [b / a for a, b in zip(t_fast, t_naive)]
    memory_rows = int(memory.shape[0])
    result = {
        "num_classes": num_classes,
        "bank_size": bank_size,
        "samples_per_class": samples_per_class,
        "memory_rows_used": memory_rows,
        "features": [n, d, h, w],
        "regions": int(classes.numel()),
        "regions_per_image": classes.numel() / n,
        "fast_s": fast_s,
        "naive_s": naive_s,
        "speedup_median": statistics.median(pairs),
        "speedup_of_medians": naive_s["median"] / fast_s["median"],
        "fast_peak_bytes": mem_fast["peak_bytes"],
        "naive_peak_bytes": mem_naive["peak_bytes"],
        "bank_bytes": bank.nbytes,
        "memory_rows_bytes": memory_rows * d * 4,
        "memory_method": ("forward+backward of centres + projection + loss (no bank update); "
                          + mem_fast["method"]),
        **agreement,
    }
    return result
