"""Batch augmentation: parsing, shapes and layouts, seeded determinism, the crop / flip / cutout geometry."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bpfree.augment import Augment
from bpfree.errors import BpfreeError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def distinct(b=64, c=2, h=6, w=7, dtype=torch.int32):
    """Images whose every value differs (from 1 up): a crop is recognisable, and 0 only comes from padding."""
    return (torch.arange(b * c * h * w, dtype=torch.int64) + 1).reshape(b, c, h, w).to(dtype)


# --- the spec ---------------------------------------------------------------------------------------
def test_parse_any_subset_in_any_order_and_print_it_back():
    a = Augment.parse(" flip, cutout=8,crop=4 ")
    assert a == Augment(crop=4, flip=True, cutout=8) and str(a) == "crop=4,flip,cutout=8"
    assert Augment.parse(str(a)) == a and Augment.parse("crop=2") == Augment(crop=2)
    for nothing in (None, "", "none", " NONE "):
        assert not Augment.parse(nothing) and str(Augment.parse(nothing)) == "none"
    x = distinct(4)
    assert Augment()(x, gen()) is x


@pytest.mark.parametrize("text, why", [
    ("crop", "crop needs a whole number of pixels >= 1"),
    ("crop=x", "crop needs a whole number"),
    ("crop=0", "crop needs a whole number"),
    ("cutout=-2", "cutout needs a whole number"),
    ("crop=1.5", "crop needs a whole number"),
    ("flip=1", "flip takes no value"),
    ("blur=3", "unknown part 'blur=3'"),
    ("crop=4,,flip", "unknown part ''"),
    ("flip,crop=2,flip", "flip given twice"),
])
def test_bad_spec_is_one_line_naming_the_valid_parts(text, why):
    with pytest.raises(BpfreeError) as e:
        Augment.parse(text)
    msg = str(e.value)
    assert msg.startswith(f"bad --augment {text!r}: {why}") and "crop=P, flip, cutout=S" in msg and "\n" not in msg


def test_check_refuses_vectors_and_a_cutout_larger_than_the_image():
    Augment(crop=4, flip=True, cutout=8).check((3, 32, 32))
    Augment().check((784,))                                       # nothing to apply: nothing to refuse
    with pytest.raises(BpfreeError, match=r"needs image inputs \(C, H, W\); the data has shape \(784,\)"):
        Augment(flip=True).check((784,))
    with pytest.raises(BpfreeError, match="cutout=9 is larger than the 8x8 images"):
        Augment(cutout=9).check((1, 8, 8))
    with pytest.raises(BpfreeError, match="needs a batch of images"):
        Augment(flip=True)(torch.zeros(4, 10), gen())


# --- shapes, layouts, determinism -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_shape_dtype_and_memory_format_are_kept_and_the_input_untouched(dtype, channels_last):
    x = distinct(16, 3, 8, 8, dtype=torch.int64).remainder(251).add(1).to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    before = x.clone()
    for spec in ("crop=2", "flip", "cutout=3", "crop=3,flip,cutout=4"):
        out = Augment.parse(spec)(x, gen())
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous(memory_format=fmt), spec
        assert channels_last or out.is_contiguous()
        assert torch.equal(x, before)
    # the layout changes nothing but the layout
    aug = Augment(crop=2, flip=True, cutout=3)
    assert torch.equal(aug(x.contiguous(), gen(5)), aug(x.contiguous(memory_format=torch.channels_last), gen(5)))


def test_same_seed_same_batch_and_generator_state():
    aug, x = Augment(crop=4, flip=True, cutout=4), distinct(32, 3, 12, 12)
    g1, g2 = gen(7), gen(7)
    a, b = aug(x, g1), aug(x, g2)
    assert torch.equal(a, b) and torch.equal(g1.get_state(), g2.get_state())
    assert not torch.equal(aug(x, g1), a)                         # the generator moved on: new draws
    assert not torch.equal(aug(x, gen(8)), a)
    # how much is drawn depends on the batch size only, not on the values (resume stays in step)
    g3, g4 = gen(7), gen(7)
    aug(x, g3), aug(torch.zeros_like(x), g4)
    assert torch.equal(g3.get_state(), g4.get_state())


# --- geometry ---------------------------------------------------------------------------------------
def _window_offsets(out, x, p):
    """For each output image, the (dy, dx) of the window of the padded image it equals (or None)."""
    padded = F.pad(x, (p, p, p, p))
    h, w = x.shape[2:]
    found = []
    for b in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(out[b], padded[b, :, dy:dy + h, dx:dx + w])]
        found.append(hits[0] if len(hits) == 1 else None)
    return found


def test_crop_is_a_window_of_the_zero_padded_image_within_bounds():
    p, x = 3, distinct(300)
    offsets = _window_offsets(Augment(crop=p)(x, gen(1)), x, p)
    assert None not in offsets                                   # every image: exactly one window, inside 0..2P
    dys, dxs = {o[0] for o in offsets}, {o[1] for o in offsets}
    assert dys == dxs == set(range(2 * p + 1))                   # every offset occurs, extremes included
    assert len(set(offsets)) > 30                                # rows and columns drawn independently


def test_flip_mirrors_some_images_and_is_an_involution():
    x, aug = distinct(200), Augment(flip=True)
    out = aug(x, gen(2))
    mirrored = [torch.equal(out[b], x[b].flip(-1)) for b in range(len(x))]
    assert all(m or torch.equal(out[b], x[b]) for b, m in enumerate(mirrored))
    assert 60 < sum(mirrored) < 140                              # about half
    assert torch.equal(aug(out, gen(2)), x)                      # the same draws flip the same images back


def test_crop_and_flip_together():
    p, x = 2, distinct(100)
    out = Augment(crop=p, flip=True)(x, gen(3))
    plain = _window_offsets(out, x, p)
    mirrored = _window_offsets(out.flip(-1), x, p)               # flipped back, a flipped crop is a window
    assert all(a is not None or b is not None for a, b in zip(plain, mirrored))
    assert sum(b is not None and a is None for a, b in zip(plain, mirrored)) > 20


@pytest.mark.parametrize("s", [1, 3, 6])
def test_cutout_zeroes_exactly_one_square_inside_the_image(s):
    x = distinct(120, 3, 6, 7, dtype=torch.int64).remainder(255).add(1).to(torch.uint8)   # no zeros
    out = Augment(cutout=s)(x, gen(4))
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))        # the same square in every channel
    assert torch.equal(out[~zero], x[~zero])                     # nothing else changes
    corners = set()
    for b in range(len(x)):
        rows, cols = zero[b, 0].any(1).nonzero().flatten(), zero[b, 0].any(0).nonzero().flatten()
        assert zero[b, 0].sum() == s * s and len(rows) == len(cols) == s      # S*S pixels, never clipped
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()          # contiguous: one square
        corners.add((int(rows[0]), int(cols[0])))
    assert {r for r, _ in corners} == set(range(6 - s + 1)) and {c for _, c in corners} == set(range(7 - s + 1))


def test_float_batches_pad_with_zero_too():
    x = torch.full((50, 1, 4, 4), 5.0)
    out = Augment(crop=2)(x, gen(5))
    assert set(out.unique().tolist()) <= {0.0, 5.0} and (out == 0).any()


# --- vectorised: no per-image Python --------------------------------------------------------------
class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_the_same_few_tensor_ops_for_any_batch_size():
    aug = Augment(crop=4, flip=True, cutout=8)
    counts = []
    for b in (2, 64, 1024):
        with _CountOps() as ops:
            aug(torch.zeros(b, 3, 32, 32, dtype=torch.uint8), gen())
        counts.append(ops.calls)
    assert counts[0] == counts[1] == counts[2] and counts[0] < 60, counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_with_a_cpu_or_cuda_generator():
    aug, x = Augment(crop=4, flip=True, cutout=8), distinct(32, 3, 32, 32, dtype=torch.int64).remainder(256)
    x = x.to(torch.uint8)
    on_cpu = aug(x, gen(9))
    assert torch.equal(aug(x.cuda(), gen(9)).cpu(), on_cpu)                  # CPU draws, indices moved over
    g = torch.Generator(device="cuda").manual_seed(9)
    out = aug(x.cuda(), g)
    assert out.device.type == "cuda" and out.shape == x.shape


def test_plus_separates_parts_too_so_a_compare_entry_can_carry_a_spec():
    assert Augment.parse("crop=2+flip") == Augment.parse("crop=2,flip") == Augment(crop=2, flip=True)
