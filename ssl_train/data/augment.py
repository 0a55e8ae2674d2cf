"""The device half of SimCLR's two-view augmentation: flip, colour jitter, grayscale and
Gaussian blur, batched on the training device with per-sample random parameters.

Why here and not in the DataLoader: with two views per image, torchvision's per-image
augmentation is what limits a CPU (about 35 two-view samples/s per core, against about
210 for decode and two crops), while the same arithmetic on a batch costs the training
device little. The CPU only decodes and crops (``ssl_train.data.decode``); this module
does the rest on uint8 crops that arrive on the device.

Why the parameters are drawn on the CPU: every random number of a sample comes from a
generator keyed by (seed, epoch, sample key, view, stage) and nothing else, so a sample
looks the same whichever rank, worker, batch position or device handles it; that is
what makes runs on different world sizes see the same global batches. Drawing 13
numbers per sample from its own numpy generator costs about 15 µs, tiny next to the
apply, and the small parameter tensors then travel to the device.

The ops follow ``torchvision.transforms.v2.functional`` on float images (the tests
compare against it) and the official SimCLR recipe (google-research/simclr
``data_util.py``): per view, flip p=0.5; colour jitter p=0.8 with brightness, contrast and
saturation factors uniform on ``[max(0, 1 - 0.8s), 1 + 0.8s]`` and a hue shift uniform on
``[-0.2s, 0.2s]``, the four in a random order per sample; grayscale p=0.2; Gaussian blur
p=0.5 with sigma uniform on [0.1, 2.0] and a kernel of 10% of the image side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEVICE_STAGE = 2
"""Generator stage of this module; the CPU crop module uses 1 (``decode.CROP_STAGE``), so
a sample's crop and colour randomness are independent even for the same key and view."""

FLIP_P = 0.5
JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's (ITU-R 601-2 luma)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # jitter_order's codes, as torchvision

# Column of each parameter in a sample's uniform draws. The layout is fixed whatever the
# strength, so changing one parameter's range never shifts another's random numbers.
_U_FLIP, _U_JITTER, _U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE, _U_GRAY, _U_BLUR, _U_SIGMA = range(9)
_U_ORDER = slice(9, 13)
_N_UNIFORMS = 13


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a sample key.

    Python's ``hash`` is salted per process, so it would give every worker different
    augmentations; blake2b is the same everywhere and forever.

    Example:
        >>> key_hash("n01440764_10026") == key_hash("n01440764_10026")
        True
        >>> 0 <= key_hash("a") < 2**64 and key_hash("a") != key_hash("b")
        True
    """
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def sample_generator(seed: int, epoch: int, key: str, view: int, stage: int) -> np.random.Generator:
    """The random generator of one view of one sample in one augmentation stage.

    Keyed by nothing but these five values, so the draws do not depend on rank, worker,
    batch position or device; ``stage`` keeps the CPU crop's draws (stage 1) apart from
    this module's (``DEVICE_STAGE``).

    Example:
        >>> a = sample_generator(0, 3, "n01440764_10026", 1, DEVICE_STAGE).random()
        >>> b = sample_generator(0, 3, "n01440764_10026", 1, DEVICE_STAGE).random()
        >>> a == b, a == sample_generator(0, 3, "n01440764_10026", 0, DEVICE_STAGE).random()
        (True, False)
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("view", view), ("stage", stage)):
        if int(value) < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value}")
    entropy = [int(seed), int(epoch), key_hash(key), int(view), int(stage)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def blur_kernel_size(side: int) -> int:
    """Gaussian blur kernel for an image side: 10% of it, made odd as official SimCLR does
    (radius ``side // 20``), so that results match the paper's recipe at every size.

    Example:
        >>> blur_kernel_size(224), blur_kernel_size(32), blur_kernel_size(250), blur_kernel_size(8)
        (23, 3, 25, 1)
    """
    return 2 * ((side // 10) // 2) + 1


@dataclass
class ViewParams:
    """Per-sample augmentation parameters of one view of a batch (first dimension B).

    Parameters of an op that a sample skips (``jitter_applied`` or ``blur_applied``
    false) are still drawn, so every sample has the same layout; they are ignored.
    ``jitter_order[i]`` is a permutation of the op codes 0..3 (brightness, contrast,
    saturation, hue: torchvision's ``ColorJitter`` codes), applied in that order.

    Example:
        >>> p = simclr_view_params(["a", "b"], seed=0, epoch=0, view=0)
        >>> len(p), p.brightness.dtype, p.jitter_order.shape
        (2, torch.float32, torch.Size([2, 4]))
        >>> p.to("cpu").flip.device.type
        'cpu'
    """

    flip: Tensor
    jitter_applied: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    jitter_order: Tensor
    grayscale: Tensor
    blur_applied: Tensor
    blur_sigma: Tensor

    def __len__(self) -> int:
        return self.flip.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ViewParams:
        """The same parameters on ``device`` (``non_blocking`` as for ``Tensor.to``).

        Example:
            >>> ViewParams.identity(3).to("cpu").hue.tolist()
            [0.0, 0.0, 0.0]
        """
        return ViewParams(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    @classmethod
    def identity(cls, batch_size: int) -> ViewParams:
        """Parameters that change nothing: evaluation, and the base of ``flip_params``.

        Example:
            >>> images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
            >>> torch.equal(apply_view_params(images, ViewParams.identity(2)), images / 255)
            True
        """
        off = torch.zeros(batch_size, dtype=torch.bool)
        one = torch.ones(batch_size, dtype=torch.float32)
        return cls(
            flip=off,
            jitter_applied=off.clone(),
            brightness=one,
            contrast=one.clone(),
            saturation=one.clone(),
            hue=torch.zeros(batch_size, dtype=torch.float32),
            jitter_order=torch.arange(4, dtype=torch.int64).repeat(batch_size, 1),
            grayscale=off.clone(),
            blur_applied=off.clone(),
            blur_sigma=one.clone(),
        )


def _uniforms(keys: Sequence[str], seed: int, epoch: int, view: int, count: int) -> np.ndarray:
    """``count`` uniforms per key, each row from that key's own generator."""
    out = np.empty((len(keys), count), dtype=np.float64)
    for row, key in enumerate(keys):
        out[row] = sample_generator(seed, epoch, key, view, DEVICE_STAGE).random(count)
    return out


def simclr_view_params(
    keys: Sequence[str], seed: int, epoch: int, view: int, strength: float = 1.0
) -> ViewParams:
    """SimCLR pretraining parameters for one view of the samples ``keys``.

    ``strength`` is the paper's colour-jitter strength s (1.0 for ImageNet, 0.5 for
    CIFAR-10 in the official code); the hue range 0.2s must stay within torchvision's
    [-0.5, 0.5], so s is at most 2.5.

    Example:
        >>> p = simclr_view_params(["n01440764_10026", "n01443537_2"], seed=0, epoch=0, view=0)
        >>> bool(((p.brightness >= 0.2) & (p.brightness <= 1.8)).all())
        True
        >>> q = simclr_view_params(["n01443537_2"], seed=0, epoch=0, view=0)
        >>> bool(q.hue[0] == p.hue[1])  # a sample's draws do not depend on its batch
        True
    """
    if not 0.0 <= strength <= 2.5:
        raise ValueError(
            f"strength must be in [0, 2.5] (hue range 0.2*strength <= 0.5), got {strength}"
        )
    u = _uniforms(keys, seed, epoch, view, _N_UNIFORMS)
    spread = 0.8 * strength
    low, high = max(0.0, 1.0 - spread), 1.0 + spread
    factors = low + (high - low) * u[:, [_U_BRIGHT, _U_CONTRAST, _U_SAT]]
    hue = 0.2 * strength * (2.0 * u[:, _U_HUE] - 1.0)
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, _U_SIGMA]
    # argsort of 4 i.i.d. uniforms is a uniformly random permutation (ties have probability 0)
    order = np.argsort(u[:, _U_ORDER], axis=1, kind="stable")

    def as_float(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return ViewParams(
        flip=torch.from_numpy(u[:, _U_FLIP] < FLIP_P),
        jitter_applied=torch.from_numpy(u[:, _U_JITTER] < JITTER_P),
        brightness=as_float(factors[:, 0]),
        contrast=as_float(factors[:, 1]),
        saturation=as_float(factors[:, 2]),
        hue=as_float(hue),
        jitter_order=torch.from_numpy(order.astype(np.int64)),
        grayscale=torch.from_numpy(u[:, _U_GRAY] < GRAYSCALE_P),
        blur_applied=torch.from_numpy(u[:, _U_BLUR] < BLUR_P),
        blur_sigma=as_float(sigma),
    )


def flip_params(keys: Sequence[str], seed: int, epoch: int, view: int) -> ViewParams:
    """Finetuning and distillation parameters: a horizontal flip with p=0.5, nothing else
    (the crop is done on the CPU), as in the paper.

    The flip is the first draw of the same generator as ``simclr_view_params``, so it
    equals that view's flip; only one number is drawn per sample.

    Example:
        >>> p = flip_params(["a", "b", "c"], seed=0, epoch=0, view=0)
        >>> bool(p.jitter_applied.any() or p.grayscale.any() or p.blur_applied.any())
        False
        >>> torch.equal(p.flip, simclr_view_params(["a", "b", "c"], 0, 0, 0).flip)
        True
    """
    params = ViewParams.identity(len(keys))
    params.flip = torch.from_numpy(_uniforms(keys, seed, epoch, view, 1)[:, 0] < FLIP_P)
    return params


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 (or float) images as float32 in [0, 1]: all that evaluation needs, and the
    first step of every augmentation (the ops are defined on [0, 1] floats).

    Example:
        >>> to_unit_float(torch.tensor([0, 51, 255], dtype=torch.uint8)).tolist()
        [0.0, 0.20000000298023224, 1.0]
    """
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)  # exact: 51 -> 0.2f
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"images must be uint8 or floating point in [0, 1], got {images.dtype}")


def _grayscale(x: Tensor) -> Tensor:
    """Luma (N, 1, H, W) with torchvision's weights and summation order."""
    r, g, b = x.unbind(dim=1)
    return (
        r.mul(GRAY_WEIGHTS[0])
        .add_(g, alpha=GRAY_WEIGHTS[1])
        .add_(b, alpha=GRAY_WEIGHTS[2])[:, None]
    )


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision's ``adjust_hue`` (RGB -> HSV, shift H, -> RGB) with a per-sample shift
    (N,), in fewer passes: H is taken in sixths straight from channel differences, and
    since V*S is max - min, S is never formed."""
    r, g, b = x.unbind(dim=1)
    minc, maxc = torch.aminmax(x, dim=1)
    span = maxc - minc
    # grey pixels (span 0) have no hue; any finite value will do, as span * ramp is 0
    inv_span = torch.where(span == 0, 1.0, span).reciprocal_()
    max_is_r = maxc == r
    max_is_g = (maxc == g) & ~max_is_r  # torchvision's precedence: red, then green, then blue
    h6 = torch.where(
        max_is_r,
        (g - b).mul_(inv_span),
        torch.where(max_is_g, (b - r).mul_(inv_span).add_(2.0), (r - g).mul_(inv_span).add_(4.0)),
    )
    h6 = h6.add_(6.0 * shift[:, None, None]).remainder_(6.0)[:, None]
    # HSV -> RGB in closed form: channel n (5, 3, 1 for R, G, B) is
    # v - v*s*clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, the same values as
    # torchvision's table lookup, without a gather.
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device)[None, :, None, None]
    k = (h6 + n).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc[:, None] - span[:, None] * ramp


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with one sigma per sample, as torchvision's
    ``gaussian_blur`` (same kernel, reflect padding) but for the whole batch at once: each
    (sample, channel) plane is a group of a grouped convolution."""
    n, c, h, w = x.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.softmax(-(offsets**2) / (2.0 * sigma[:, None] ** 2), dim=1)  # (n, K)
    # Small sigmas give tail weights near float32's denormal range, which halve the speed
    # of CPU convolutions; dropping weights under 1e-20 moves a pixel by under 1e-18.
    kernel = kernel.masked_fill(kernel < 1e-20, 0.0)
    kernel = kernel.repeat_interleave(c, dim=0)
    planes = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    planes = F.conv2d(planes, kernel[:, None, :, None], groups=n * c)
    planes = F.conv2d(planes, kernel[:, None, None, :], groups=n * c)
    return planes.reshape(n, c, h, w)


def _indices(mask: Tensor, device: torch.device) -> Tensor | None:
    """Positions where a CPU mask is true, on ``device``; None when there are none.

    Deciding subsets on the CPU copy of the parameters keeps the device from having to
    report a count back (a synchronisation) before it can continue."""
    idx = torch.nonzero(mask).squeeze(1)
    if idx.numel() == 0:
        return None
    return idx.to(device, non_blocking=True)


def _on_subset(x: Tensor, idx: Tensor | None, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Replace, in place, the samples ``idx`` of ``x`` by ``fn(those samples, idx)``; the
    others are untouched and cost nothing but the copy back."""
    if idx is None:
        return x
    return x.index_copy_(0, idx, fn(x.index_select(0, idx), idx))


def apply_view_params(images: Tensor, params: ViewParams, blur_kernel: int | None = None) -> Tensor:
    """Augment a batch of one view on its own device: flip, colour jitter (each sample's
    four ops in its own order), grayscale, blur, as ``params`` says per sample.

    ``images`` is uint8 or float in [0, 1], (B, 3, H, W), on any device; the result is
    float32 in [0, 1], channels_last if the input was. ``blur_kernel`` defaults to 10% of
    the height (``blur_kernel_size``). The arithmetic stays float32 under autocast.
    ``params`` may be on the CPU (preferred: which samples take which op is decided there
    without a device synchronisation) or on the images' device.

    Example:
        >>> images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> out = apply_view_params(images, simclr_view_params("abcd", seed=0, epoch=0, view=0))
        >>> out.shape, out.dtype, bool(out.min() >= 0 and out.max() <= 1)
        (torch.Size([4, 3, 32, 32]), torch.float32, True)
        >>> p = flip_params("abcd", seed=0, epoch=0, view=0)
        >>> torch.equal(apply_view_params(images, p)[p.flip], images[p.flip].flip(-1) / 255)
        True
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be a (B, 3, H, W) batch of RGB images, got shape {tuple(images.shape)}"
        )
    if len(params) != images.shape[0]:
        raise ValueError(
            f"params are for {len(params)} samples but the batch has {images.shape[0]}: draw "
            "them with the batch's keys"
        )
    height, width = images.shape[-2:]
    kernel_size = blur_kernel_size(height) if blur_kernel is None else blur_kernel
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur_kernel must be a positive odd integer, got {kernel_size}")
    if kernel_size // 2 >= min(height, width):
        raise ValueError(
            f"blur_kernel {kernel_size} is too large for {height}x{width} images (reflect "
            "padding needs kernel // 2 < side); pass a smaller blur_kernel"
        )
    channels_last = (
        images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    )
    device = images.device
    cpu = params.to("cpu")
    on_device = params.to(device, non_blocking=True)

    with torch.autocast(device.type, enabled=False):
        flip_idx = _indices(cpu.flip, device)
        if flip_idx is not None:  # on the (4x smaller) uint8 data, before converting
            images = images.index_copy(0, flip_idx, images.index_select(0, flip_idx).flip(-1))
        x = to_unit_float(images)
        if x.data_ptr() == images.data_ptr():  # float32 input: never write into the caller's
            x = x.clone()

        for slot in range(4):
            op = torch.where(cpu.jitter_applied, cpu.jitter_order[:, slot], -1)
            x = _blend_slot(x, op, on_device, device)
            x = _on_subset(
                x, _indices(op == 3, device), lambda sub, idx: _adjust_hue(sub, on_device.hue[idx])
            )

        x = _on_subset(
            x,
            _indices(cpu.grayscale, device),
            lambda sub, _: _grayscale(sub).expand(-1, 3, -1, -1),
        )
        if kernel_size > 1:
            x = _on_subset(
                x,
                _indices(cpu.blur_applied, device),
                lambda sub, idx: _gaussian_blur(sub, on_device.blur_sigma[idx], kernel_size),
            )
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _blend_slot(x: Tensor, op: Tensor, params: ViewParams, device: torch.device) -> Tensor:
    """One jitter slot's brightness, contrast and saturation for the whole batch, in one
    pass: each is torchvision's ``clamp(f*x + (1-f)*target)`` with target 0, the mean
    luma, or the luma image. Samples doing another op (or none) get f = 1, which leaves
    them bit for bit unchanged, so no gather is needed."""
    if not bool(((op >= 0) & (op <= 2)).any()):
        return x
    codes = op.to(device, non_blocking=True)[:, None, None, None]
    factor = torch.ones(x.shape[0], dtype=torch.float32, device=device)[:, None, None, None]
    factor = torch.where(codes == 0, params.brightness[:, None, None, None], factor)
    factor = torch.where(codes == 1, params.contrast[:, None, None, None], factor)
    factor = torch.where(codes == 2, params.saturation[:, None, None, None], factor)
    if bool(((op == 1) | (op == 2)).any()):
        luma = _grayscale(x)
        mean = luma.mean(dim=(1, 2, 3), keepdim=True)
        target = torch.where(codes == 2, luma, torch.where(codes == 1, mean, 0.0))
        return x.mul(factor).add_(target * (1.0 - factor)).clamp_(0.0, 1.0)
    return x.mul(factor).clamp_(0.0, 1.0)


class SimCLRAugment:
    """Both views of SimCLR pretraining for a batch: view 0 and view 1 of each key get
    independent parameters, drawn from (seed, epoch, key, view). No normalisation: SimCLR
    feeds [0, 1] images to the network.

    Example:
        >>> augment = SimCLRAugment()
        >>> crops = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
        >>> a, b = augment(crops[0], crops[1], keys=["w", "x", "y", "z"], seed=0, epoch=0)
        >>> a.shape, b.dtype
        (torch.Size([4, 3, 32, 32]), torch.float32)
        >>> torch.equal(a, augment(crops[0], crops[1], ["w", "x", "y", "z"], 0, 0)[0])
        True
    """

    def __init__(self, strength: float = 1.0, blur_kernel: int | None = None) -> None:
        self.strength = strength
        self.blur_kernel = blur_kernel

    def params(self, keys: Sequence[str], seed: int, epoch: int) -> tuple[ViewParams, ViewParams]:
        """Both views' parameters, e.g. to draw them ahead of time (in a DataLoader worker).

        Example:
            >>> p0, p1 = SimCLRAugment().params(["a"], seed=0, epoch=0)
            >>> bool(p0.hue[0] != p1.hue[0])
            True
        """
        return tuple(simclr_view_params(keys, seed, epoch, view, self.strength) for view in (0, 1))

    def __call__(
        self, view1: Tensor, view2: Tensor, keys: Sequence[str], seed: int, epoch: int
    ) -> tuple[Tensor, Tensor]:
        p0, p1 = self.params(keys, seed, epoch)
        return (
            apply_view_params(view1, p0, self.blur_kernel),
            apply_view_params(view2, p1, self.blur_kernel),
        )
