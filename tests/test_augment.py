"""Device-side augmentation: each batched op against torchvision's per-image op, the
parameter distributions against the paper's, and determinism by (seed, epoch, key, view)."""

from __future__ import annotations

import itertools
from dataclasses import fields

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy import stats

from ssl_train.data.augment import (
    SimCLRAugment,
    ViewParams,
    apply_view_params,
    blur_kernel_size,
    flip_params,
    key_hash,
    sample_generator,
    simclr_view_params,
    to_unit_float,
)

TOLERANCE = 2 / 255
OPS = ("brightness", "contrast", "saturation", "hue")
N_STAT = 20_000  # keys for the distribution tests
P_MIN = 1e-3  # a correct sampler fails one of these tests with probability ~1e-3 each


def _images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 images with flat patches, pure black/white and saturated pixels, where
    HSV and clamping have their edge cases."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=gen)
    images[:, 2] //= 3  # unequal channel means: luma mean != mean over channels
    images[:, :, : side // 4, : side // 4] = 0
    images[:, :, -side // 4 :, : side // 4] = 255
    images[:, :, : side // 4, -side // 4 :] = 128  # grey: hue undefined
    images[:, 0, -side // 4 :, -side // 4 :] = 255  # saturated red corner
    images[:, 1:, -side // 4 :, -side // 4 :] = 0
    return images


def _random_factors(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "brightness": 0.2 + 1.6 * torch.rand(n, generator=gen),
        "contrast": 0.2 + 1.6 * torch.rand(n, generator=gen),
        "saturation": 0.2 + 1.6 * torch.rand(n, generator=gen),
        "hue": -0.2 + 0.4 * torch.rand(n, generator=gen),
        "sigma": 0.1 + 1.9 * torch.rand(n, generator=gen),
        "order": torch.stack([torch.randperm(4, generator=gen) for _ in range(n)]),
    }


def _tv_op(image: torch.Tensor, op: str, value: float) -> torch.Tensor:
    if op == "brightness":
        return TF.adjust_brightness(image, value)
    if op == "contrast":
        return TF.adjust_contrast(image, value)
    if op == "saturation":
        return TF.adjust_saturation(image, value)
    return TF.adjust_hue(image, value)


def _torchvision_reference(
    images: torch.Tensor, params: ViewParams, kernel: int | None = None
) -> torch.Tensor:
    """The same augmentation, one image at a time, with torchvision's ops on floats."""
    out = []
    kernel = blur_kernel_size(images.shape[-2]) if kernel is None else kernel
    for i, image in enumerate(images.float() / 255):
        if params.flip[i]:
            image = TF.horizontal_flip(image)
        if params.jitter_applied[i]:
            for code in params.jitter_order[i].tolist():
                op = OPS[code]
                image = _tv_op(image, op, getattr(params, op)[i].item())
        if params.grayscale[i]:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if params.blur_applied[i] and kernel > 1:
            sigma = params.blur_sigma[i].item()
            image = TF.gaussian_blur(image, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
        out.append(image)
    return torch.stack(out)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- each op against torchvision -------------------------------------------------------


def test_flip_matches_torchvision() -> None:
    images = _images(8, 32)
    params = ViewParams.identity(8)
    params.flip = torch.tensor([True, False] * 4)
    out = apply_view_params(images, params)
    assert torch.equal(out, _torchvision_reference(images, params))
    assert torch.equal(out[1], images[1] / 255)  # unflipped samples untouched


@pytest.mark.parametrize("op", OPS)
def test_each_jitter_op_matches_torchvision(op: str) -> None:
    """Only ``op`` moves (the others at their identity values); its slot varies by sample."""
    images = _images(8, 32)
    factors = _random_factors(8)
    params = ViewParams.identity(8)
    params.jitter_applied = torch.tensor([True] * 7 + [False])
    params.jitter_order = factors["order"]
    setattr(params, op, factors[op])
    out = apply_view_params(images, params)
    expected = torch.stack(
        [_tv_op(image, op, factors[op][i].item()) for i, image in enumerate(images.float() / 255)]
    )
    assert _max_diff(out[:7], expected[:7]) <= TOLERANCE
    assert torch.equal(out[7], images[7] / 255)  # jitter not applied: bit for bit


def test_grayscale_matches_torchvision() -> None:
    images = _images(8, 32)
    params = ViewParams.identity(8)
    params.grayscale = torch.tensor([True, True, False, True, False, False, True, False])
    out = apply_view_params(images, params)
    assert _max_diff(out, _torchvision_reference(images, params)) <= TOLERANCE
    assert torch.equal(out[2], images[2] / 255)


@pytest.mark.parametrize(("side", "kernel"), [(32, None), (32, 7), (224, None)])
def test_blur_matches_torchvision(side: int, kernel: int | None) -> None:
    n = 8 if side == 32 else 3
    images = _images(n, side)
    params = ViewParams.identity(n)
    params.blur_applied = torch.tensor([True, False, True, True, True, False, True, True][:n])
    params.blur_sigma = _random_factors(n)["sigma"]
    params.blur_sigma[0] = 2.0  # the widest kernel the recipe draws
    out = apply_view_params(images, params, blur_kernel=kernel)
    assert _max_diff(out, _torchvision_reference(images, params, kernel)) <= TOLERANCE
    assert torch.equal(out[1], images[1] / 255)


def test_blur_kernel_is_ten_percent_of_the_side_and_odd() -> None:
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3
    for side in range(10, 600):
        k = blur_kernel_size(side)
        assert k % 2 == 1 and abs(k - side / 10) <= 1


@pytest.mark.parametrize(("n", "side", "seed"), [(16, 32, 0), (16, 32, 1), (4, 224, 2)])
def test_full_composition_matches_torchvision(n: int, side: int, seed: int) -> None:
    """Real drawn parameters, every op on, each sample's jitter in its own order."""
    images = _images(n, side, seed)
    params = simclr_view_params([f"img{i}" for i in range(n)], seed=seed, epoch=0, view=0)
    params.jitter_applied[:] = True
    params.blur_applied[: n // 2] = True
    params.grayscale[:] = False
    params.grayscale[0] = True
    assert len({tuple(o) for o in params.jitter_order.tolist()}) > 1
    out = apply_view_params(images, params)
    assert _max_diff(out, _torchvision_reference(images, params)) <= TOLERANCE


def test_float_and_uint8_inputs_agree() -> None:
    images = _images(8, 32)
    params = simclr_view_params([str(i) for i in range(8)], seed=0, epoch=0, view=0)
    floats = images.float() / 255
    before = floats.clone()
    assert _max_diff(apply_view_params(floats, params), apply_view_params(images, params)) < 1e-6
    assert torch.equal(floats, before)  # the caller's tensor is never written


def test_output_is_float32_in_unit_range() -> None:
    images = _images(32, 32)
    out = apply_view_params(images, simclr_view_params([str(i) for i in range(32)], 0, 0, 0))
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1 and not out.isnan().any()


def test_rejects_bad_inputs_with_a_hint() -> None:
    images = _images(2, 32)
    with pytest.raises(ValueError, match="batch has 2"):
        apply_view_params(images, ViewParams.identity(3))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        apply_view_params(images[:, :1], ViewParams.identity(2))
    with pytest.raises(ValueError, match="odd"):
        apply_view_params(images, ViewParams.identity(2), blur_kernel=4)
    with pytest.raises(TypeError, match="uint8 or floating"):
        to_unit_float(images.to(torch.int32))
    with pytest.raises(ValueError, match="strength"):
        simclr_view_params(["a"], 0, 0, 0, strength=3.0)
    with pytest.raises(ValueError, match="non-negative"):
        sample_generator(-1, 0, "a", 0, 2)


# --- parameter distributions --------------------------------------------------------------


@pytest.fixture(scope="module")
def many_params() -> ViewParams:
    return simclr_view_params([f"n{i:08d}" for i in range(N_STAT)], seed=7, epoch=3, view=1)


@pytest.mark.parametrize(
    ("name", "p"),
    [("flip", 0.5), ("jitter_applied", 0.8), ("grayscale", 0.2), ("blur_applied", 0.5)],
)
def test_rates_match_the_paper(many_params: ViewParams, name: str, p: float) -> None:
    hits = int(getattr(many_params, name).sum())
    assert stats.binomtest(hits, N_STAT, p).pvalue > P_MIN, (name, hits / N_STAT)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("brightness", 0.2, 1.8),
        ("contrast", 0.2, 1.8),
        ("saturation", 0.2, 1.8),
        ("hue", -0.2, 0.2),
        ("blur_sigma", 0.1, 2.0),
    ],
)
def test_ranges_are_uniform(many_params: ViewParams, name: str, low: float, high: float) -> None:
    values = getattr(many_params, name).double().numpy()
    assert low <= values.min() and values.max() <= high
    assert stats.kstest(values, stats.uniform(low, high - low).cdf).pvalue > P_MIN


def test_strength_scales_the_jitter_ranges() -> None:
    params = simclr_view_params([f"k{i}" for i in range(5000)], 0, 0, 0, strength=0.5)
    assert (
        stats.kstest(params.brightness.double().numpy(), stats.uniform(0.6, 0.8).cdf).pvalue > P_MIN
    )
    assert stats.kstest(params.hue.double().numpy(), stats.uniform(-0.1, 0.2).cdf).pvalue > P_MIN


def test_jitter_orders_are_uniform_permutations(many_params: ViewParams) -> None:
    orders = [tuple(row) for row in many_params.jitter_order.tolist()]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    counts = [orders.count(perm) for perm in itertools.permutations(range(4))]
    assert stats.chisquare(counts).pvalue > P_MIN


def test_flips_and_parameters_are_independent(many_params: ViewParams) -> None:
    """Different parameters come from different draws, not one shared number."""
    table = np.histogram2d(
        many_params.flip.numpy().astype(float), many_params.grayscale.numpy().astype(float), bins=2
    )[0]
    assert stats.chi2_contingency(table).pvalue > P_MIN
    continuous = ("brightness", "contrast", "saturation", "hue", "blur_sigma")
    for x, y in itertools.combinations(continuous, 2):
        rho = stats.spearmanr(getattr(many_params, x), getattr(many_params, y)).statistic
        assert abs(rho) < 0.05, (x, y, rho)  # 0.05 is 7 standard errors at 20,000 samples


def test_flip_params_flip_only(many_params: ViewParams) -> None:
    keys = [f"n{i:08d}" for i in range(N_STAT)]
    params = flip_params(keys, seed=7, epoch=3, view=1)
    assert stats.binomtest(int(params.flip.sum()), N_STAT, 0.5).pvalue > P_MIN
    assert not (params.jitter_applied.any() or params.grayscale.any() or params.blur_applied.any())
    images = _images(4, 32)
    out = apply_view_params(images, flip_params(keys[:4], 7, 3, 1))
    assert _max_diff(out, _torchvision_reference(images, flip_params(keys[:4], 7, 3, 1))) == 0


# --- determinism ----------------------------------------------------------------------------


def _row(params: ViewParams, i: int) -> dict[str, list]:
    return {f.name: getattr(params, f.name)[i].tolist() for f in fields(params)}


def test_key_hash_and_draws_are_pinned() -> None:
    """These values must never change between releases: a resumed or reproduced run
    would otherwise see other augmentations than the original."""
    assert key_hash("n01440764_10026") == 8622913096764076126
    assert sample_generator(0, 0, "n01440764_10026", 0, 2).random() == 0.398239100633731
    assert len({key_hash(f"k{i}") for i in range(10_000)}) == 10_000


def test_params_depend_only_on_seed_epoch_key_view() -> None:
    abc = simclr_view_params(["a", "b", "c"], seed=1, epoch=2, view=0)
    ca = simclr_view_params(["c", "a"], seed=1, epoch=2, view=0)
    assert _row(abc, 0) == _row(ca, 1) and _row(abc, 2) == _row(ca, 0)
    base = _row(abc, 0)
    for other in (
        simclr_view_params(["a"], seed=1, epoch=2, view=1),
        simclr_view_params(["a"], seed=1, epoch=3, view=0),
        simclr_view_params(["a"], seed=2, epoch=2, view=0),
    ):
        row = _row(other, 0)
        assert row != base
        assert row["hue"] != base["hue"] and row["blur_sigma"] != base["blur_sigma"]


def test_stage_separates_crop_from_device_draws() -> None:
    assert sample_generator(0, 0, "a", 0, 1).random() != sample_generator(0, 0, "a", 0, 2).random()


def test_same_batch_gives_bitwise_identical_output() -> None:
    images = _images(16, 32)
    keys = [f"s{i}" for i in range(16)]
    augment = SimCLRAugment()
    a1, b1 = augment(images, images, keys, seed=0, epoch=5)
    a2, b2 = augment(images, images, keys, seed=0, epoch=5)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)  # the two views differ
    assert not torch.equal(a1, augment(images, images, keys, seed=0, epoch=6)[0])


def test_sample_output_does_not_depend_on_its_batch() -> None:
    images = _images(3, 32)
    full = apply_view_params(images, simclr_view_params(["a", "b", "c"], 0, 0, 0))
    part = apply_view_params(images[[2, 0]], simclr_view_params(["c", "a"], 0, 0, 0))
    assert _max_diff(full[[2, 0]], part) < 1e-6


# --- autocast, memory format, device -----------------------------------------------------------


def test_bf16_autocast_stays_close_to_float32() -> None:
    images = _images(8, 32)
    params = simclr_view_params([str(i) for i in range(8)], 0, 0, 0)
    expected = apply_view_params(images, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = apply_view_params(images, params)
    assert out.dtype == torch.float32
    assert _max_diff(out, expected) <= 1e-6
    # bf16 images in, as an autocast pipeline might hand them over
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = apply_view_params((images / 255).bfloat16(), params)
    assert _max_diff(out, expected) <= TOLERANCE


def test_channels_last_is_preserved_and_equal() -> None:
    images = _images(8, 32)
    params = simclr_view_params([str(i) for i in range(8)], 0, 0, 0)
    expected = apply_view_params(images, params)
    for x in (images, images.float() / 255):
        out = apply_view_params(x.contiguous(memory_format=torch.channels_last), params)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert _max_diff(out, expected) <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    images = _images(16, 64)
    params = simclr_view_params([str(i) for i in range(16)], 0, 0, 0)
    expected = apply_view_params(images, params)
    out = apply_view_params(images.cuda(), params)
    assert out.is_cuda and _max_diff(out.cpu(), expected) <= 1e-5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = apply_view_params(images.cuda(), params.to("cuda"))
    assert _max_diff(out.cpu(), expected) <= 1e-5
