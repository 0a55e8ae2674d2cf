"""CPU stage: crop parameters as torchvision draws them, reduced-scale decoding, determinism."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from shards.images import encode_jpeg
from shards.synthetic import photo_like
from ssl_train.data import decode


def _photo(width: int = 500, height: int = 375) -> bytes:
    return encode_jpeg(photo_like(np.random.default_rng(3), width, height))


def test_crop_boxes_follow_torchvisions_random_resized_crop_distribution() -> None:
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    image = torch.empty(3, 375, 500)
    theirs = [RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    rng = np.random.default_rng(0)
    ours = [decode.random_resized_crop_box(rng, 500, 375) for _ in range(4000)]
    their_area = [h * w / (500 * 375) for _, _, h, w in theirs]
    our_area = [w * h / (500 * 375) for _, _, w, h in ours]
    their_ratio = [math.log(w / h) for _, _, h, w in theirs]
    our_ratio = [math.log(w / h) for _, _, w, h in ours]
    assert stats.ks_2samp(our_area, their_area).pvalue > 0.001
    assert stats.ks_2samp(our_ratio, their_ratio).pvalue > 0.001
    assert min(our_area) >= 0.079 and max(our_area) <= 1.0
    assert all(0 <= left <= 500 - w and 0 <= top <= 375 - h for left, top, w, h in ours)
    # where the crop lands is uniform too: left offsets as a fraction of the slack
    our_left = [left / (500 - w) for left, _, w, _ in ours if w < 450]
    their_left = [j / (500 - w) for _, j, _, w in theirs if w < 450]
    assert stats.ks_2samp(our_left, their_left).pvalue > 0.001


def test_center_crop_matches_the_official_evaluation_crop() -> None:
    # official: side = rint(0.875 * short side), offset = ((size - side) + 1) // 2
    assert decode.center_crop_box(500, 375) == (86, 24, 328, 328)
    assert decode.center_crop_box(224, 224) == (14, 14, 196, 196)
    assert decode.center_crop_box(97, 1003) == (6, 459, 85, 85)
    jpeg = _photo()
    full = decode._decode(jpeg, 500, 375, 1, True, fastdct=True)
    expected = np.rint(np.clip(decode.tf_bicubic_resize(full[24:352, 86:414], (32, 32)), 0, 255))
    uncropped = np.rint(np.clip(decode.tf_bicubic_resize(full, (32, 32)), 0, 255))
    out = decode.eval_view(jpeg, 32)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert np.abs(out - uncropped).mean() > 2.0


def test_eval_view_decodes_at_full_resolution_with_tensorflows_idct(monkeypatch) -> None:
    """The training path would decode this crop at 1/8 (and 1/2 for 224 px); evaluation
    decodes it whole, with the fast integer IDCT (tf.io.decode_jpeg's default), which
    gives other pixels than the accurate one (tests/test_eval_preprocessing_tf.py checks
    them against TensorFlow's)."""
    calls = []
    original = decode._decode

    def recording(*args, **kwargs):
        image = original(*args, **kwargs)
        calls.append(((image.shape[1], image.shape[0]), kwargs.get("fastdct", False)))
        return image

    monkeypatch.setattr(decode, "_decode", recording)
    jpeg = encode_jpeg(photo_like(np.random.default_rng(4), 901, 677))
    decode.eval_view(jpeg, 32)
    decode.eval_view(jpeg, 224)
    decode.one_view(jpeg, "k", 32, seed=0, epoch=0)  # the training path is unchanged
    assert calls[:2] == [((901, 677), True)] * 2
    assert calls[2][1] is False and calls[2][0][0] < 901
    fast = original(jpeg, 901, 677, 1, True, fastdct=True)
    assert not np.array_equal(fast, original(jpeg, 901, 677, 1, True))


@pytest.mark.parametrize(("in_size", "out_size"), [(4, 2), (5, 9), (328, 224), (1, 3), (2625, 224)])
def test_bicubic_taps_are_a_normalised_four_tap_kernel(in_size: int, out_size: int) -> None:
    index, weight = decode.bicubic_taps(in_size, out_size)
    assert index.shape == weight.shape == (out_size, 4) and weight.dtype == np.float32
    assert index.min() >= 0 and index.max() < in_size
    assert np.allclose(weight.sum(axis=1), 1, atol=1e-6)
    # the centre of output pixel i, (i + 0.5) * in/out - 0.5, lies between taps 1 and 2
    centre = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    position = (index * weight).sum(axis=1)
    interior = (index[:, 0] < index[:, 1]) & (index[:, 2] < index[:, 3])
    assert np.allclose(position[interior], centre[interior], atol=2e-3)


def _dense(in_size: int, out_size: int) -> np.ndarray:
    index, weight = decode.bicubic_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), index.ravel()), weight.ravel())
    return matrix


@pytest.mark.parametrize(
    ("shape", "size"), [((328, 500), (224, 224)), ((61, 53), (224, 96)), ((7, 1), (3, 5))]
)
def test_resize_is_two_weight_matrix_products(shape, size) -> None:
    """Gathering four taps per row and column is the separable matrix product
    ``Wy @ image @ Wx.T`` per channel; any dtype in, float32 out."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = decode.tf_bicubic_resize(image, size)
    assert ours.dtype == np.float32 and ours.shape == (*size, 3)
    rows, columns = _dense(shape[0], size[0]), _dense(shape[1], size[1])
    expected = np.stack([rows @ image[..., c] @ columns.T for c in range(3)], axis=-1)
    assert np.abs(ours - expected).max() < 1e-3  # grey levels; float32 against float64
    assert np.array_equal(ours, decode.tf_bicubic_resize(image.astype(np.float32), size))
    assert decode.tf_bicubic_resize(image.astype(np.float64), size).dtype == np.float32


def test_resize_keeps_constants_and_same_size_images() -> None:
    rng = np.random.default_rng(2)
    image = rng.random((37, 53, 3), dtype=np.float32)
    assert np.array_equal(decode.tf_bicubic_resize(image, (37, 53)), image)
    flat = np.full((37, 53, 3), 0.75, np.float32)
    for size in ((224, 224), (5, 3), (37, 200)):  # taps off the edges are renormalised away
        assert np.allclose(decode.tf_bicubic_resize(flat, size), 0.75, atol=1e-6)


def test_eval_view_clips_the_overshoot_of_bicubic_before_rounding() -> None:
    """Keys' cubic overshoots at hard edges (below 0 and above 255): clipped, not wrapped."""
    stripes = np.zeros((300, 300, 3), np.uint8)
    stripes[:, (np.arange(300) // 5) % 2 == 0] = 255
    jpeg = encode_jpeg(Image.fromarray(stripes))
    left, top, w, h = decode.center_crop_box(300, 300)
    full = decode._decode(jpeg, 300, 300, 1, True, fastdct=True)
    resized = decode.tf_bicubic_resize(full[top : top + h, left : left + w], (224, 224))
    assert resized.min() < -0.5 and resized.max() > 255.5
    view = decode.eval_view(jpeg, 224)
    assert view.min() == 0 and view.max() == 255
    assert np.array_equal(view, np.rint(np.clip(resized, 0, 255)))


def _record_decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """(width, height) of every image ``decode_crops`` decodes, whichever decoder ran."""
    sizes: list[tuple[int, int]] = []
    original = decode._decode

    def recording(*args, **kwargs):
        image = original(*args, **kwargs)
        sizes.append((image.shape[1], image.shape[0]))
        return image

    monkeypatch.setattr(decode, "_decode", recording)
    return sizes


def test_decoding_uses_the_smallest_dct_scale_that_keeps_crops_at_output_size(monkeypatch) -> None:
    sizes = _record_decoded_sizes(monkeypatch)
    jpeg = _photo()
    decode.decode_crops(jpeg, 32, [(0, 0, 500, 375)])
    decode.decode_crops(jpeg, 32, [(10, 10, 64, 64)])  # a small crop needs more pixels
    decode.decode_crops(jpeg, 32, [(10, 10, 64, 63)])  # one pixel short of 1/2: full
    decode.decode_crops(jpeg, 224, [(0, 0, 300, 300)])
    decode.decode_crops(jpeg, 32, [(0, 0, 500, 375), (7, 9, 128, 130)])  # the smaller decides
    assert sizes == [(63, 47), (250, 188), (500, 375), (500, 375), (125, 94)]


def test_every_crop_keeps_output_resolution_and_no_more_than_twice_it(monkeypatch) -> None:
    """Too few pixels (a crop below the output size) blurs views; more than twice the
    output size means a smaller DCT scale would have served, and decoding paid for it."""
    sizes = _record_decoded_sizes(monkeypatch)
    jpeg = _photo()
    rng = np.random.default_rng(5)
    for size in (16, 32, 64, 112, 224):
        for _ in range(25):
            boxes = [decode.random_resized_crop_box(rng, 500, 375) for _ in range(2)]
            decode.decode_crops(jpeg, size, boxes)
            scale = 500 / sizes[-1][0]
            smallest = min(min(w, h) for _, _, w, h in boxes) / scale
            assert smallest >= size or scale == 1, (size, boxes, sizes[-1])
            assert smallest < 2 * size or scale >= 7.9, (size, boxes, sizes[-1])


def test_reduced_scale_views_look_like_full_scale_crops() -> None:
    jpeg = _photo()
    boxes = [(20, 30, 400, 300), (100, 60, 200, 250)]
    fast = decode.decode_crops(jpeg, 64, boxes).astype(np.float32)
    full = Image.open(io.BytesIO(jpeg)).convert("RGB")
    for view, (left, top, w, h) in enumerate(boxes):
        slow = np.asarray(full.resize((64, 64), Image.BILINEAR, box=(left, top, left + w, top + h)))
        assert np.abs(fast[view] - slow.astype(np.float32)).mean() < 4.0


def test_views_depend_only_on_seed_epoch_key_and_view() -> None:
    jpeg = _photo(200, 150)
    a = decode.two_views(jpeg, "n01440764_1", 32, seed=0, epoch=0)
    assert np.array_equal(a, decode.two_views(jpeg, "n01440764_1", 32, seed=0, epoch=0))
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, decode.two_views(jpeg, "n01440764_2", 32, seed=0, epoch=0))
    assert not np.array_equal(a, decode.two_views(jpeg, "n01440764_1", 32, seed=0, epoch=1))
    assert not np.array_equal(a, decode.two_views(jpeg, "n01440764_1", 32, seed=1, epoch=0))
    assert decode.one_view(jpeg, "k", 32, 0, 0).shape == (32, 32, 3)


@pytest.mark.parametrize("size", [(40, 300), (300, 40)])
def test_extreme_aspect_ratios_fall_back_to_a_centre_crop(size: tuple[int, int]) -> None:
    class NeverFits:
        def uniform(self, low, high):
            return high if low > 0 else 0.0

        def integers(self, low, high):
            return low

    left, top, w, h = decode.random_resized_crop_box(NeverFits(), *size)
    assert max(w, h) / min(w, h) == pytest.approx(4 / 3, abs=0.02)
    assert (left, top) == ((size[0] - w) // 2, (size[1] - h) // 2)


def _variant(kind: str, width: int, height: int) -> bytes:
    """A photo-like JPEG as cameras and ImageNet have them: chroma subsampling 4:2:0,
    4:2:2 or 4:4:4, progressive, grayscale, CMYK (what real files hold)."""
    img = photo_like(np.random.default_rng([width, height]), width, height)
    out = io.BytesIO()
    if kind == "gray":
        img.convert("L").save(out, "JPEG", quality=92)
    elif kind == "cmyk":
        img.convert("CMYK").save(out, "JPEG", quality=92)
    elif kind == "progressive":
        img.save(out, "JPEG", quality=92, progressive=True)
    else:
        img.save(out, "JPEG", quality=92, subsampling={"420": 2, "422": 1, "444": 0}[kind])
    return out.getvalue()


def _reference(jpeg: bytes, size: int, box: decode.Box, resample=Image.BILINEAR) -> np.ndarray:
    """Full-resolution PIL decode, then PIL's resize of the box: what views approximate."""
    left, top, w, h = box
    full = Image.open(io.BytesIO(jpeg)).convert("RGB")
    return np.asarray(full.resize((size, size), resample, box=(left, top, left + w, top + h)))


def _boxes(rng: np.random.Generator, width: int, height: int) -> list[decode.Box]:
    """Random crops plus the awkward ones: the whole image, each corner, edge-hugging
    strips, a crop smaller than the output (upscaled), odd offsets and sides."""
    edge = [
        (0, 0, width, height),
        (0, 0, width // 3 + 1, height // 2 + 1),
        (width - width // 2 - 1, height - height // 3 - 1, width // 2 + 1, height // 3 + 1),
        (0, height - 41, 37, 41),
        (width - 17, 0, 17, height),
        (3, 5, width - 8, 13),
    ]
    return edge + [decode.random_resized_crop_box(rng, width, height) for _ in range(12)]


@pytest.mark.parametrize("kind", ["420", "422", "444", "progressive", "gray", "cmyk"])
@pytest.mark.parametrize("dims", [(500, 375), (333, 251), (97, 1003)])
def test_views_match_full_resolution_crops_for_every_kind_of_jpeg(kind, dims) -> None:
    """Every DCT scale (sizes 16-224 on these images use 1/8 to 1) and both resizers
    (whole-pixel boxes in torch, fractional ones in PIL) stay within the tolerance."""
    width, height = dims
    jpeg = _variant(kind, width, height)
    rng = np.random.default_rng(width + height)
    boxes = _boxes(rng, width, height)
    for size in (16, 32, 64, 224):
        for box in boxes:
            view = decode.decode_crops(jpeg, size, [box])[0]
            error = np.abs(view.astype(np.float32) - _reference(jpeg, size, box)).mean()
            assert error < 4.0, (kind, dims, size, box, error)
            if kind == "gray":
                assert np.array_equal(view[..., 0], view[..., 1])
                assert np.array_equal(view[..., 0], view[..., 2])


def test_full_scale_views_are_pils_bilinear_filter_to_a_grey_level() -> None:
    """At full scale the resize runs in torch: it must be PIL's antialiased filter (a
    plain bilinear interpolation, without antialiasing, is off by several grey levels)."""
    jpeg = _photo()
    rng = np.random.default_rng(11)
    for _ in range(30):
        box = decode.random_resized_crop_box(rng, 500, 375)
        view = decode.decode_crops(jpeg, 224, [box])[0].astype(np.float32)
        difference = np.abs(view - _reference(jpeg, 224, box))
        # the same filter: off by more than one grey level only at a few border pixels
        assert difference.mean() < 0.1 and (difference > 1).mean() < 0.01, box


def test_ordinary_jpegs_never_go_through_pil(monkeypatch) -> None:
    """The decode runs in libjpeg-turbo through simplejpeg (about 20% less CPU than PIL's
    decoder, and no PIL image to convert); PIL stays for CMYK and broken files."""
    from PIL import ImageFile

    def refuse(self):
        raise AssertionError("PIL decoded an ordinary JPEG")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    for kind in ("420", "444", "progressive", "gray"):
        assert decode.two_views(_variant(kind, 200, 150), "k", 32, 0, 0).shape == (2, 32, 32, 3)
    with pytest.raises(AssertionError, match="PIL decoded"):
        decode.two_views(_variant("cmyk", 200, 150), "k", 32, 0, 0)


def test_broken_files_fail_as_pil_fails_and_warnings_do_not() -> None:
    jpeg = _photo(200, 150)
    with pytest.raises((OSError, ValueError)):
        decode.two_views(jpeg[: len(jpeg) // 2], "k", 32, 0, 0)  # truncated
    with pytest.raises((OSError, ValueError, SyntaxError)):
        decode.two_views(b"not an image at all", "k", 32, 0, 0)
    # two stray bytes before the scan: libjpeg warns ("extraneous bytes before marker"),
    # PIL decodes it, and so must the CPU stage (ImageNet has files like this)
    sos = jpeg.index(b"\xff\xda")
    warned = jpeg[:sos] + b"\x00\x00" + jpeg[sos:]
    box = (10, 10, 150, 120)
    view = decode.decode_crops(warned, 32, [box])[0].astype(np.float32)
    assert np.abs(view - _reference(warned, 32, box)).mean() < 1.0


def test_views_go_straight_into_a_batch_slot_and_threads_are_left_as_found() -> None:
    jpeg = _photo()
    batch = np.zeros((2, 3, 64, 64, 3), dtype=np.uint8)  # (views, B, S, S, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        decode.two_views(jpeg, "k", 64, seed=0, epoch=0, out=batch[:, 1])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(batch[:, 1], decode.two_views(jpeg, "k", 64, seed=0, epoch=0))
    assert not batch[:, 0].any() and not batch[:, 2].any()
    decode.one_view(jpeg, "k", 64, seed=0, epoch=0, out=batch[0, 2])
    assert np.array_equal(batch[0, 2], decode.one_view(jpeg, "k", 64, seed=0, epoch=0))
    with pytest.raises(ValueError, match="out must be uint8"):
        decode.two_views(jpeg, "k", 32, seed=0, epoch=0, out=batch[:, 0])
