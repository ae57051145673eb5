"""region_contrast.memory_bank against a per-class Python list pushed one row at a time."""
import pytest
import torch
import torch.nn.functional as F

from region_contrast.memory_bank import RegionMemoryBank


class ListBank:
    """The FIFO as one Python list per class, fed row by row: obviously correct, slow."""

    def __init__(self, num_classes, size):
        self.size = size
        self.rows = [[] for _ in range(num_classes)]
        self.pushed = [0] * num_classes

    def push(self, features, classes):
        for row, c in zip(features, classes.tolist()):
            self.rows[c].append(row.clone())
            self.pushed[c] += 1
            if len(self.rows[c]) > self.size:
                self.rows[c].pop(0)


def oldest_first(bank, c):
    """Class c's filled slots, oldest first (the ring read from its write pointer)."""
    count, ptr = int(bank.count[c]), int(bank.ptr[c])
    slots = bank.features[c]
    if count < bank.size:
        return list(slots[:count])
    return list(torch.cat([slots[ptr:], slots[:ptr]]))


def assert_same_as_reference(bank, ref, dtype=torch.float32):
    for c, rows in enumerate(ref.rows):
        assert int(bank.count[c]) == len(rows)
        assert int(bank.ptr[c]) == ref.pushed[c] % bank.size
        stored = oldest_first(bank, c)
        assert len(stored) == len(rows)
        for got, want in zip(stored, rows):
            assert torch.equal(got, want.to(dtype))


def random_pushes(seed, num_classes, size, dim, steps=12):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        # Mostly small pushes, sometimes more rows of one class than the ring holds, sometimes none.
        n = int(torch.randint(0, 3 * size + 2, (1,), generator=g)) if step % 3 == 0 else \
            int(torch.randint(0, 5, (1,), generator=g))
        features = torch.randn(n, dim, generator=g)
        if step % 4 == 1:
            classes = torch.full((n,), int(torch.randint(0, num_classes, (1,), generator=g)))
        else:
            classes = torch.randint(0, num_classes, (n,), generator=g)
        yield features, classes


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("size", [1, 3, 7])
def test_fifo_matches_reference(seed, size):
    bank, ref = RegionMemoryBank(4, size, 5), ListBank(4, size)
    for features, classes in random_pushes(seed, 4, size, 5):
        bank.push(features, classes)
        ref.push(features, classes)
        assert_same_as_reference(bank, ref)


def test_more_rows_than_slots_in_one_push():
    bank = RegionMemoryBank(2, 3, 1)
    bank.push(torch.arange(8.0).unsqueeze(1), torch.tensor([0, 1, 0, 0, 0, 0, 1, 0]))
    # Class 0 received 0, 2, 3, 4, 5, 7: the last three survive, pointer advanced by six.
    assert sorted(bank.features[0, :, 0].tolist()) == [4.0, 5.0, 7.0]
    assert bank.ptr.tolist() == [0, 2] and bank.count.tolist() == [3, 2]
    assert [float(v) for v in oldest_first(bank, 0)] == [4.0, 5.0, 7.0]


def test_snapshot_never_returns_unwritten_slots():
    bank = RegionMemoryBank(5, 4, 3)
    features, classes = bank.snapshot()
    assert features.shape == (0, 3) and classes.shape == (0,)
    ref = ListBank(5, 4)
    for features, classes in random_pushes(1, 4, 4, 3, steps=6):  # class 4 is never pushed
        bank.push(features + 10, classes)
        ref.push(features + 10, classes)
        snap, snap_classes = bank.snapshot()
        assert snap.dtype == torch.float32 and snap_classes.dtype == torch.long
        assert snap.shape[0] == int(bank.count.sum())
        assert (snap.abs().sum(dim=1) > 0).all()  # zeros are unwritten slots
        assert 4 not in snap_classes.tolist()
        for c in range(5):
            expected = torch.stack(ref.rows[c]) if ref.rows[c] else torch.zeros(0, 3)
            got = snap[snap_classes == c]
            assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(dtype):
    bank, ref = RegionMemoryBank(3, 4, 6, dtype=dtype), ListBank(3, 4)
    assert bank.features.dtype == dtype and bank.dtype == dtype
    for features, classes in random_pushes(2, 3, 4, 6):
        bank.push(features, classes)
        ref.push(features, classes)
    assert_same_as_reference(bank, ref, dtype=dtype)
    snap, _ = bank.snapshot()
    assert snap.dtype == torch.float32
    assert bank.nbytes == 3 * 4 * 6 * 2


def test_pushed_rows_are_detached_copies():
    bank = RegionMemoryBank(2, 3, 4)
    source = torch.randn(3, 4, requires_grad=True)
    rows = source * 2
    bank.push(rows, torch.tensor([0, 1, 0]))
    assert not bank.features.requires_grad
    snap, _ = bank.snapshot()
    assert not snap.requires_grad
    before = bank.features.clone()
    with torch.no_grad():
        rows.add_(100.0)
        source.add_(100.0)
    assert torch.equal(bank.features, before)
    plain = torch.randn(2, 4)
    bank.push(plain, torch.tensor([1, 1]))
    after = bank.features.clone()
    plain.zero_()
    assert torch.equal(bank.features, after)


def test_state_dict_round_trip():
    bank = RegionMemoryBank(4, 5, 3, dtype=torch.bfloat16)
    for features, classes in random_pushes(3, 4, 5, 3):
        bank.push(features, classes)
    state = bank.state_dict()
    assert set(state) == {"features", "ptr", "count"}
    fresh = RegionMemoryBank(4, 5, 3, dtype=torch.bfloat16)
    fresh.load_state_dict(state)
    for name in ("features", "ptr", "count"):
        assert torch.equal(getattr(fresh, name), getattr(bank, name))
    for a, b in zip(bank.snapshot(), fresh.snapshot()):
        assert torch.equal(a, b)
    # Both continue identically.
    more, more_classes = torch.randn(9, 3), torch.tensor([0, 1, 1, 1, 1, 1, 1, 3, 0])
    bank.push(more, more_classes)
    fresh.push(more, more_classes)
    assert torch.equal(bank.features, fresh.features) and torch.equal(bank.ptr, fresh.ptr)


def test_state_dict_inside_a_model_and_shape_mismatch():
    model = torch.nn.Module()
    model.bank = RegionMemoryBank(4, 5, 3)
    model.bank.push(torch.randn(3, 3), torch.tensor([0, 1, 2]))
    state = model.state_dict()
    assert {"bank.features", "bank.ptr", "bank.count"} <= set(state)
    for other in (RegionMemoryBank(4, 6, 3), RegionMemoryBank(4, 5, 8), RegionMemoryBank(3, 5, 3)):
        target = torch.nn.Module()
        target.bank = other
        with pytest.raises(RuntimeError) as info:
            target.load_state_dict(state)
        message = str(info.value)
        assert "bank.features" in message and "(4, 5, 3)" in message
        assert str(tuple(other.features.shape)) in message
        assert "MEMORY_SIZE" in message and "PROJ_DIM" in message
        assert message.count("size mismatch") == 0  # only our message, not a duplicate


def test_partial_state_keeps_the_bank_empty():
    bank = RegionMemoryBank(3, 4, 2)
    bank.push(torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1]))
    state = bank.state_dict()
    del state["features"]  # what fvcore's Checkpointer does to a buffer of another shape
    fresh = RegionMemoryBank(3, 4, 2)
    result = fresh.load_state_dict(state, strict=False)
    assert result.missing_keys == ["features"]
    assert int(fresh.count.sum()) == 0 and int(fresh.ptr.sum()) == 0
    with pytest.raises(RuntimeError, match="features"):
        RegionMemoryBank(3, 4, 2).load_state_dict(state)


def test_load_casts_to_storage_dtype():
    bank = RegionMemoryBank(3, 4, 2)
    bank.push(torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1]))
    half = RegionMemoryBank(3, 4, 2, dtype=torch.bfloat16)
    half.load_state_dict(bank.state_dict())
    assert half.features.dtype == torch.bfloat16
    assert torch.equal(half.features, bank.features.to(torch.bfloat16))
    assert torch.equal(half.count, bank.count) and torch.equal(half.ptr, bank.ptr)


def test_non_finite_rows_are_rejected_and_bank_unchanged():
    bank = RegionMemoryBank(3, 4, 2)
    bank.push(torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1]))
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    bad = torch.randn(4, 2)
    bad[1, 0] = float("nan")
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="2 of 4 rows"):
        bank.push(bad, torch.tensor([0, 1, 2, 0]))
    for k, v in bank.state_dict().items():
        assert torch.equal(v, before[k])
    half = RegionMemoryBank(3, 4, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="1 of 2 rows"):
        half.push(torch.tensor([[1.0, 0.0], [1e6, 0.0]]), torch.tensor([0, 1]))  # inf in fp16
    assert int(half.count.sum()) == 0


def test_invalid_pushes():
    bank = RegionMemoryBank(3, 4, 2)
    with pytest.raises(ValueError, match=r"\[3\]"):
        bank.push(torch.randn(2, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\(R, 2\)"):
        bank.push(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="classes"):
        bank.push(torch.randn(2, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        bank.push(torch.randn(2, 2), torch.tensor([0.0, 1.0]))
    assert int(bank.count.sum()) == 0
    bank.push(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert int(bank.count.sum()) == 0
    with pytest.raises(ValueError, match="size"):
        RegionMemoryBank(3, 0, 2)


@pytest.mark.parametrize("per_class", [1, 2, 3])
def test_sample_respects_per_class_and_filled_slots(per_class):
    bank = RegionMemoryBank(4, 5, 3)
    bank.push(torch.randn(10, 3) + 10, torch.tensor([0] * 7 + [1, 1] + [2]))  # class 3 empty
    snap, snap_classes = bank.snapshot()
    snap_rows = {c: set(map(tuple, snap[snap_classes == c].tolist())) for c in range(4)}
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        rows, classes = bank.sample(per_class, generator=g)
        assert rows.dtype == torch.float32
        for c in range(4):
            mine = rows[classes == c]
            assert mine.shape[0] == min(per_class, int(bank.count[c]))
            as_tuples = list(map(tuple, mine.tolist()))
            assert len(set(as_tuples)) == len(as_tuples)  # distinct slots
            assert set(as_tuples) <= snap_rows[c]
            seen.update((c, t) for t in as_tuples)
    assert len(seen) == snap.shape[0]  # every filled slot gets drawn eventually


def test_sample_all_is_snapshot():
    bank = RegionMemoryBank(3, 4, 2)
    bank.push(torch.randn(6, 2), torch.tensor([0, 0, 1, 0, 0, 0]))
    for per_class in (0, 4, 100):
        for a, b in zip(bank.sample(per_class), bank.snapshot()):
            assert torch.equal(a, b)


def test_fill_fraction_nbytes_repr():
    bank = RegionMemoryBank(171, 10, 256, dtype=torch.float16)
    assert bank.fill_fraction() == 0.0
    bank.push(torch.randn(25, 256), torch.tensor([0] * 15 + [1] * 10))
    assert bank.fill_fraction() == pytest.approx(20 / 1710)
    assert bank.num_slots == 1710
    assert bank.nbytes == 171 * 10 * 256 * 2
    text = repr(bank)
    assert "num_classes=171" in text and "size=10" in text and "MiB" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_snapshot_is_a_copy_that_later_pushes_do_not_change(dtype):
    bank = RegionMemoryBank(3, 4, 5, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for fill in (5, 20):  # partly filled, then full (the steady state)
        bank.push(F.normalize(torch.randn(fill, 5, generator=g), dim=1),
                  torch.arange(fill) % 3)
        copied, copied_classes = bank.snapshot()
        assert torch.equal(copied_classes, torch.sort(copied_classes).values)  # grouped by class
        before = copied.clone()
        bank.push(F.normalize(torch.randn(6, 5, generator=g), dim=1), torch.arange(6) % 3)
        assert torch.equal(copied, before)
