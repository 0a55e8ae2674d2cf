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
    jpeg = _photo()
    full = Image.open(io.BytesIO(jpeg)).convert("RGB")
    expected = np.asarray(full.resize((32, 32), Image.BICUBIC, box=(86, 24, 414, 352)), np.float32)
    uncropped = np.asarray(full.resize((32, 32), Image.BICUBIC), np.float32)
    out = decode.eval_view(jpeg, 32).astype(np.float32)
    assert np.abs(out - expected).mean() < 4.0
    assert np.abs(out - uncropped).mean() > 2 * np.abs(out - expected).mean()


def test_decoding_uses_the_smallest_dct_scale_that_keeps_crops_at_output_size(monkeypatch) -> None:
    scales: list[tuple[int, int]] = []
    from PIL.JpegImagePlugin import JpegImageFile

    original = JpegImageFile.draft

    def recording(self, mode, size):
        result = original(self, mode, size)
        scales.append(self.size)
        return result

    monkeypatch.setattr(JpegImageFile, "draft", recording)
    jpeg = _photo()
    decode.decode_crops(jpeg, 32, [(0, 0, 500, 375)])
    decode.decode_crops(jpeg, 32, [(10, 10, 64, 64)])  # a small crop needs more pixels
    decode.decode_crops(jpeg, 224, [(0, 0, 300, 300)])
    assert scales == [(63, 47), (250, 188), (500, 375)]  # 1/8, 1/2, full


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
