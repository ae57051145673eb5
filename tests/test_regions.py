"""region_contrast.regions against slow float64 references written with Python loops."""
import pytest
import torch

from region_contrast.regions import (
    dynamic_subset_centers,
    region_centers,
    region_pixel_index,
    sample_region_pixels,
)

IGNORE = 255


def reference_centers(features, labels, num_classes, ignore_value=IGNORE):
    """One loop per (image, class, pixel): obviously correct, slow."""
    n, d, h, w = features.shape
    centers, classes, images = [], [], []
    for i in range(n):
        for c in range(num_classes):
            total, count = torch.zeros(d, dtype=torch.float64), 0
            for y in range(h):
                for x in range(w):
                    label = int(labels[i, y, x])
                    if label != ignore_value and label == c:
                        total += features[i, :, y, x].double()
                        count += 1
            if count:
                centers.append(total / count)
                classes.append(c)
                images.append(i)
    if not centers:
        return torch.zeros(0, d, dtype=torch.float64), torch.zeros(0).long(), torch.zeros(0).long()
    return torch.stack(centers), torch.tensor(classes), torch.tensor(images)


def random_labels(generator, n, h, w, num_classes, ignore_fraction=0.2):
    labels = torch.randint(0, num_classes, (n, h, w), generator=generator)
    ignored = torch.rand(n, h, w, generator=generator) < ignore_fraction
    return labels.masked_fill(ignored, IGNORE)


def assert_matches_reference(features, labels, num_classes, **kwargs):
    centers, classes, images = region_centers(features, labels, num_classes, **kwargs)
    ref_centers, ref_classes, ref_images = reference_centers(
        features, labels, num_classes, **kwargs
    )
    assert centers.dtype == (torch.float64 if features.dtype == torch.float64 else torch.float32)
    assert classes.dtype == torch.long and images.dtype == torch.long
    assert torch.equal(classes, ref_classes)
    assert torch.equal(images, ref_images)
    torch.testing.assert_close(centers.double(), ref_centers, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, d, h, w = (int(v) for v in torch.randint(1, 6, (4,), generator=g))
    num_classes = int(torch.randint(1, 8, (1,), generator=g))
    features = torch.randn(n, d, h, w, generator=g)
    labels = random_labels(g, n, h, w, num_classes, ignore_fraction=0.3)
    assert_matches_reference(features, labels, num_classes)


def test_edge_cases():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(3, 4, 4, 5, generator=g)
    labels = torch.full((3, 4, 5), 0, dtype=torch.long)
    labels[0, 1, 2] = 3  # a one-pixel region
    labels[0, 2:, :] = IGNORE
    labels[1] = IGNORE  # an image that is all ignore
    labels[2, :2] = 2  # class 2 only in image 2
    labels[2, 3, 4] = IGNORE
    assert_matches_reference(features, labels, num_classes=4)
    centers, classes, images = region_centers(features, labels, 4)
    assert classes.tolist() == [0, 3, 0, 2] and images.tolist() == [0, 0, 2, 2]
    torch.testing.assert_close(centers[1], features[0, :, 1, 2])
    assert 1 not in images.tolist()


def test_all_ignored_gives_no_rows():
    features = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.full((2, 4, 4), IGNORE)
    centers, classes, images = region_centers(features, labels, 5)
    assert centers.shape == (0, 3) and classes.shape == (0,) and images.shape == (0,)
    centers.sum().backward()  # still part of the graph
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_other_label_dtypes_and_ignore_values():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 3, 5, 4, generator=g)
    labels = random_labels(g, 2, 5, 4, 6)
    assert_matches_reference(features, labels.to(torch.uint8), 6)
    assert_matches_reference(features, labels.int(), 6)
    negative_ignore = labels.masked_fill(labels == IGNORE, -1)
    assert_matches_reference(features, negative_ignore, 6, ignore_value=-1)


def test_gradients_match_reference():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    labels = random_labels(g, 2, 4, 5, 3)
    weights = torch.randn(len(reference_centers(features, labels, 3)[0]), 3, generator=g,
                          dtype=torch.float64)

    ours = features.clone().requires_grad_()
    (region_centers(ours, labels, 3)[0] * weights).sum().backward()
    ref = features.clone().requires_grad_()
    (reference_centers(ref, labels, 3)[0] * weights).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad)

    small = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    small_labels = random_labels(g, 2, 3, 3, 3)
    assert torch.autograd.gradcheck(lambda f: region_centers(f, small_labels, 3)[0], (small,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_pool_in_float32(dtype):
    g = torch.Generator().manual_seed(4)
    # Many pixels of one region: a half-precision running sum would lose digits here.
    features = (torch.randn(1, 4, 64, 64, generator=g) + 10).to(dtype).requires_grad_()
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[0, :8] = 1
    centers, _, _ = region_centers(features, labels, 2)
    assert centers.dtype == torch.float32
    ref, _, _ = reference_centers(features.detach(), labels, 2)
    torch.testing.assert_close(centers.double(), ref, rtol=1e-6, atol=1e-6)
    centers.sum().backward()
    assert features.grad.dtype == dtype


def test_autocast_returns_float32():
    features = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        projected = torch.nn.functional.conv2d(features, torch.randn(5, 3, 1, 1))
        assert projected.dtype == torch.bfloat16
        centers, _, _ = region_centers(projected, labels, 3)
    assert centers.dtype == torch.float32


def test_errors_are_clear():
    features = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="feature resolution"):
        region_centers(features, torch.zeros(2, 32, 32, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="feature resolution"):
        region_centers(features, torch.zeros(3, 8, 8, dtype=torch.long), 4)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[1, 3, 3] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        region_centers(features, labels, 4)
    labels[1, 3, 3] = -2
    with pytest.raises(ValueError, match=r"\[-2\]"):
        region_centers(features, labels, 4)
    with pytest.raises(ValueError, match="integer"):
        region_centers(features, torch.zeros(2, 8, 8), 4)


def test_region_pixel_index_assigns_every_pixel():
    g = torch.Generator().manual_seed(5)
    labels = random_labels(g, 3, 6, 7, 5)
    region_id, classes, images = region_pixel_index(labels, 5)
    _, ref_classes, ref_images = reference_centers(torch.zeros(3, 1, 6, 7), labels, 5)
    assert torch.equal(classes, ref_classes) and torch.equal(images, ref_images)
    flat = labels.reshape(-1)
    pixel_image = torch.arange(3).repeat_interleave(42)
    for p in range(flat.numel()):
        if flat[p] == IGNORE:
            assert region_id[p] == -1
        else:
            r = int(region_id[p])
            assert classes[r] == flat[p] and images[r] == pixel_image[p]


def _region_sizes(region_id, num_regions):
    return [int((region_id == r).sum()) for r in range(num_regions)]


@pytest.mark.parametrize("per_region", [1, 2, 5, 9, 1000])
def test_sample_region_pixels_counts(per_region):
    g = torch.Generator().manual_seed(6)
    labels = random_labels(g, 2, 9, 9, 4)
    labels[0, 0, 0] = 3  # at least one region of size 1 likely; make one certain
    labels[0, labels[0] == 3] = 0
    labels[0, 0, 0] = 3
    region_id, classes, _ = region_pixel_index(labels, 4)
    num_regions = classes.numel()
    pixels, regions = sample_region_pixels(region_id, num_regions, per_region, generator=g)
    assert pixels.unique().numel() == pixels.numel()
    assert torch.equal(region_id[pixels], regions)
    assert torch.all(regions[1:] >= regions[:-1])
    sizes = _region_sizes(region_id, num_regions)
    for r in range(num_regions):
        assert int((regions == r).sum()) == min(per_region, sizes[r])


@pytest.mark.parametrize("per_region", [2, 4, 7, 10])
def test_sample_region_pixels_prefers_hard_pixels(per_region):
    g = torch.Generator().manual_seed(7)
    labels = random_labels(g, 2, 10, 10, 3, ignore_fraction=0.1)
    region_id, classes, _ = region_pixel_index(labels, 3)
    num_regions = classes.numel()
    hard = (torch.rand(2, 10, 10, generator=g) < 0.15).reshape(-1)
    sizes = _region_sizes(region_id, num_regions)
    for _ in range(5):
        pixels, regions = sample_region_pixels(region_id, num_regions, per_region, hard,
                                               generator=g)
        assert pixels.unique().numel() == pixels.numel()
        for r in range(num_regions):
            mine = pixels[regions == r]
            assert mine.numel() == min(per_region, sizes[r])
            available = int((hard & (region_id == r)).sum())
            assert int(hard[mine].sum()) >= min(per_region // 2, available)


def test_sample_region_pixels_is_random_and_reproducible():
    labels = torch.zeros(1, 10, 5, dtype=torch.long)
    region_id, classes, _ = region_pixel_index(labels, 1)
    draw = lambda seed: sample_region_pixels(  # noqa: E731
        region_id, 1, 10, generator=torch.Generator().manual_seed(seed)
    )[0]
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0).sort()[0], draw(1).sort()[0])
    seen = torch.cat([draw(s) for s in range(100)]).unique()
    assert seen.numel() == 50  # every pixel gets drawn (a miss has probability 0.8**100 each)


def test_sample_region_pixels_empty_and_all_hard():
    region_id = torch.full((12,), -1)
    pixels, regions = sample_region_pixels(region_id, 0, 4)
    assert pixels.numel() == 0 and regions.numel() == 0
    region_id = torch.tensor([0, 0, 0, 1, -1, 1, 1, 1, 1])
    pixels, regions = sample_region_pixels(region_id, 2, 3, torch.ones(9, dtype=torch.bool))
    assert regions.tolist() == [0, 0, 0, 1, 1, 1]
    assert 4 not in pixels.tolist()


def test_dynamic_full_fraction_equals_region_centers():
    g = torch.Generator().manual_seed(8)
    features = torch.randn(2, 5, 6, 6, generator=g)
    labels = random_labels(g, 2, 6, 6, 4)
    centers, classes, images = region_centers(features, labels, 4)
    dyn, dyn_classes, dyn_images = dynamic_subset_centers(features, labels, 4, 3, 1.0, generator=g)
    torch.testing.assert_close(dyn, centers.repeat_interleave(3, dim=0))
    assert torch.equal(dyn_classes, classes.repeat_interleave(3))
    assert torch.equal(dyn_images, images.repeat_interleave(3))


@pytest.mark.parametrize("fraction", [1e-9, 0.3, 0.7])
def test_dynamic_centers_are_means_of_nonempty_subsets(fraction):
    g = torch.Generator().manual_seed(9)
    n, h, w = 2, 5, 6
    labels = random_labels(g, n, h, w, 3)
    labels[1, 0, 0] = 2
    labels[1][labels[1] == 2] = 0
    labels[1, 0, 0] = 2  # a one-pixel region
    # Feature = one-hot of the pixel index, so a mean reveals exactly which pixels it averaged.
    num_pixels = n * h * w
    features = torch.eye(num_pixels).reshape(num_pixels, n, h, w).permute(1, 0, 2, 3)
    region_id, _, _ = region_pixel_index(labels, 3)
    samples = 4
    dyn, classes, _ = dynamic_subset_centers(features, labels, 3, samples, fraction, generator=g)
    num_regions = int(region_id.max()) + 1
    assert dyn.shape == (num_regions * samples, num_pixels)
    sizes = []
    for row in range(dyn.shape[0]):
        region = row // samples
        subset = torch.nonzero(dyn[row], as_tuple=True)[0]
        assert subset.numel() >= 1
        assert torch.all(region_id[subset] == region)
        torch.testing.assert_close(dyn[row, subset], torch.full((subset.numel(),),
                                                                1.0 / subset.numel()))
        sizes.append((subset.numel(), int((region_id == region).sum())))
    if fraction < 1e-6:
        assert all(k == 1 for k, _ in sizes)
    else:
        picked = sum(k for k, _ in sizes) / sum(total for _, total in sizes)
        assert abs(picked - fraction) < 0.2


def test_dynamic_zero_samples_and_errors():
    features = torch.randn(1, 3, 4, 4)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    dyn, classes, images = dynamic_subset_centers(features, labels, 2, 0, 0.5)
    assert dyn.shape == (0, 3) and classes.shape == (0,) and images.shape == (0,)
    with pytest.raises(ValueError, match="fraction"):
        dynamic_subset_centers(features, labels, 2, 1, 0.0)
    with pytest.raises(ValueError, match="fraction"):
        dynamic_subset_centers(features, labels, 2, 1, 1.5)


def test_dynamic_centers_are_differentiable():
    features = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    dyn, _, _ = dynamic_subset_centers(features, labels, 1, 2, 0.5)
    dyn.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
