"""``--decode gpu``: decode a batch's JPEGs on the training GPU (nvJPEG), crop and resize.

Why: on the CPU path (``ssl_train.data.decode``) every DataLoader worker decodes each JPEG
and crops its views, so a node needs several cores per GPU to keep the GPU fed. With
``--decode gpu`` the workers only read each JPEG's header and draw its crop boxes (the
same ``decode.crop_boxes`` as the CPU path), and ship the JPEG bytes and boxes
(``stream.EncodedBatch``); the training process decodes the whole batch with one batched
``torchvision.io.decode_jpeg(..., device="cuda")`` call, crops each box at full
resolution and resizes it to S x S on the GPU. The result is the ``LocalBatch`` the CPU
path would have shipped, with uint8 views (views, B, 3, S, S) already on the device, so
the device augmentation and the model see no difference.

Why it is not the default: the decode then runs on the training GPU, in the step, and
takes GPU time and memory from the model; where a node has the cores (a cluster job
gives every rank 8 workers), the workers decode for free alongside the step.
``bench/gpu_all.py`` measures both on one GPU.

How close to the CPU path (the same boxes, other pixels): the CPU path decodes at the
smallest DCT scale that keeps each crop at output size and resizes with PIL's bilinear
filter; here the image is decoded at full resolution and each box is resized with
torch's antialiased bilinear filter (PIL's triangle filter, in float, rounded). On 500x375
photo-like JPEGs the two differ by a mean absolute 0.18 of 255 at 224 px and 1.4 at 32
px (where the CPU path decodes at 1/8 scale); against a full-resolution PIL decode and
box resize this path is within 0.11-0.23 per view at both sizes (the remainder: PIL's
filter also reads pixels just outside the box). These figures are the CPU device's
(libjpeg-turbo); nvJPEG, as torchvision calls it, upsamples chroma without libjpeg's
interpolation, which a CPU simulation puts at about +0.75 at 224 px and +0.13 at 32 px.
``tests/test_device_decode.py`` holds the tolerances, with that allowance on a GPU.

Which samples nvJPEG is not given, decoded by libjpeg-turbo on the CPU (torchvision's
CPU decoder, as exact as PIL's) and moved to the device instead: CMYK JPEGs (libjpeg
converts Adobe CMYK to RGB as PIL does; nvJPEG is not relied on for it), files that are
not JPEGs, and JPEGs whose last bytes hold no end-of-image marker (a truncated file:
libjpeg refuses it, as PIL does on the CPU path, where nvJPEG may return a partial
image). Grayscale JPEGs are decoded to RGB by nvJPEG itself. A sample nvJPEG refuses is
retried on the CPU; one neither can decode is corrupt, named in the batch's ``corrupt``
list, and its slot filled as the CPU path fills it.

Evaluation (``stream.EvalStream``: the centre crop, bicubic) always decodes on the CPU.
"""

from __future__ import annotations

import io
import itertools
import logging
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from ssl_train.data.decode import Box
from ssl_train.data.stream import EncodedBatch, LocalBatch, fill_slots
from ssl_train.errors import UserError

log = logging.getLogger(__name__)

# what nvJPEG is given: JPEGs whose header PIL reads as RGB (YCbCr) or grayscale
NVJPEG_HEADERS = frozenset({"JPEG RGB", "JPEG L"})
END_OF_IMAGE = b"\xff\xd9"
# an end-of-image marker may be followed by a few padding bytes; further back it is not
# the end of a complete file (0xFF is byte-stuffed in the scan, so the pair is a marker)
EOI_SEARCH_BYTES = 16


def _quietly(call, *args, **kwargs):
    """A torchvision.io call without its DeprecationWarning: torchvision 0.29 deprecates
    its image decoders in favour of TorchCodec, which this project does not install (the
    decoder is the same nvJPEG/libjpeg-turbo); the warning would repeat every step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return call(*args, **kwargs)


def decode_jpegs(jpegs: list[Tensor], device: torch.device | str) -> list[Tensor]:
    """Decode JPEGs (1-D uint8 CPU tensors) to uint8 RGB (3, H, W) on ``device``: one
    batched nvJPEG call on a GPU, libjpeg-turbo on the CPU. Raises ``RuntimeError`` if any
    of them cannot be decoded (nvJPEG returns nothing then).

    Example:
        >>> from PIL import Image
        >>> from shards.images import encode_jpeg
        >>> jpeg = torch.frombuffer(bytearray(encode_jpeg(Image.new("L", (40, 30)))), dtype=torch.uint8)
        >>> [tuple(image.shape) for image in decode_jpegs([jpeg, jpeg], "cpu")]
        [(3, 30, 40), (3, 30, 40)]
    """
    device = torch.device(device)
    if device.type == "cuda":
        drain_before_nvjpeg(device)
    return _quietly(decode_jpeg, jpegs, mode=ImageReadMode.RGB, device=device)


def drain_before_nvjpeg(device: torch.device) -> None:
    """Wait for the work queued on ``device``'s current stream before nvJPEG decodes.

    nvJPEG's hardware engine writes its output buffers without waiting for the stream
    it is given, and torchvision 0.29 decodes on a stream of its own: the buffers come
    from torch's caching allocator, which hands out a block freed by kernels still queued
    on the training stream, so the decode can overwrite what the previous step is still
    reading (reproduced on an H100: pytorch/vision#9606, meta-pytorch/torchcodec#1634).
    The training loop no longer waits for the GPU every step, so nothing else drains the
    stream first. This wait costs the overlap of the host with the previous step's
    device work, on the ``--decode gpu`` path only; the decode call itself returns only
    when its stream is done, so little more is lost.
    """
    torch.cuda.current_stream(device).synchronize()


def decode_on_host(image: Tensor) -> Tensor:
    """Decode any image torchvision reads (JPEG, CMYK JPEG, PNG, ...) on the CPU, to RGB."""
    return _quietly(decode_image, image, mode=ImageReadMode.RGB)


def resized_crop(image: Tensor, box: Box | Sequence[int], size: int) -> Tensor:
    """Crop ``box`` (left, top, width, height) from a uint8 (3, H, W) image and resize it to
    (3, size, size) uint8 with an antialiased bilinear filter (PIL's BILINEAR, as the CPU
    path resizes), on the image's device.

    Example:
        >>> image = torch.full((3, 375, 500), 200, dtype=torch.uint8)
        >>> crop = resized_crop(image, (10, 20, 300, 200), 32)
        >>> crop.shape, crop.dtype, int(crop.min()), int(crop.max())
        (torch.Size([3, 32, 32]), torch.uint8, 200, 200)
    """
    left, top, width, height = (int(v) for v in box)
    region = image[None, :, top : top + height, left : left + width].float()
    resized = F.interpolate(
        region, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


def host_reason(header: str, jpeg: Tensor) -> str | None:
    """Why a sample is decoded on the CPU rather than by nvJPEG, or None.

    Example:
        >>> host_reason("JPEG CMYK", torch.tensor([0xFF, 0xD8, 0xFF, 0xD9], dtype=torch.uint8))
        'a CMYK JPEG (libjpeg converts it to RGB as PIL does)'
        >>> host_reason("JPEG RGB", torch.tensor([0xFF, 0xD8, 0xFF, 0xD9], dtype=torch.uint8)) is None
        True
    """
    if header == "JPEG CMYK":
        return "a CMYK JPEG (libjpeg converts it to RGB as PIL does)"
    if header not in NVJPEG_HEADERS:
        return f"not a baseline RGB or grayscale JPEG (its header says {header!r})"
    if END_OF_IMAGE not in jpeg[-EOI_SEARCH_BYTES:].numpy().tobytes():
        return "no end-of-image marker (truncated?); libjpeg checks it as the CPU path does"
    return None


class BatchDecoder:
    """Turns the workers' ``EncodedBatch`` into the ``LocalBatch`` the CPU path would have
    made, its views on ``device`` (``"cuda"``: nvJPEG; ``"cpu"``: the same path with
    libjpeg-turbo, which is how it is tested without a GPU).

    Example:
        >>> decoder = BatchDecoder("cpu", image_size=224)
        >>> local = decoder(encoded_batch)  # doctest: +SKIP
        >>> local.views.shape, local.views.device  # doctest: +SKIP
        (torch.Size([2, 128, 3, 224, 224]), device(type='cpu'))
    """

    def __init__(self, device: torch.device | str, image_size: int) -> None:
        self.device, self.image_size = torch.device(device), image_size
        self._told: set[str] = set()  # samples whose CPU fallback was logged once
        if self.device.type == "cuda":
            check_device_decoding(self.device)

    def __call__(self, batch: EncodedBatch) -> LocalBatch:
        offsets = batch.offsets.tolist()
        spans = [batch.data[a:b] for a, b in itertools.pairwise(offsets)]
        images: list[Tensor | None] = [None] * len(spans)
        unreadable = set(batch.corrupt)
        on_device: list[int] = []
        for i, (key, header, span) in enumerate(zip(batch.keys, batch.headers, spans, strict=True)):
            if key in unreadable:
                continue
            reason = host_reason(header, span) if self.device.type == "cuda" else None
            if reason is None:
                on_device.append(i)
            else:
                self._tell(key, reason)
                images[i] = self._on_host(key, span)
        if on_device:
            self._decode_on_device(on_device, spans, batch.keys, images)
        corrupt = [key for key, image in zip(batch.keys, images, strict=True) if image is None]
        if len(corrupt) == len(images):
            raise ValueError(f"every sample of step {batch.step} is corrupt: {corrupt[:3]}")
        fill = fill_slots([image is not None for image in images])
        boxes = batch.boxes.tolist()
        size = self.image_size
        views = torch.empty(
            (len(boxes), len(fill), 3, size, size), dtype=torch.uint8, device=self.device
        )
        for slot, i in enumerate(fill):
            for view, view_boxes in enumerate(boxes):
                views[view, slot] = resized_crop(images[i], view_boxes[i], size)
        labels = batch.labels[fill].to(self.device, non_blocking=True)
        keys = [batch.keys[i] for i in fill]
        return LocalBatch(batch.epoch, batch.step, keys, labels, views, corrupt)

    def _decode_on_device(
        self, chosen: list[int], spans: list[Tensor], keys: list[str], images: list
    ) -> None:
        """One batched call; if any sample fails it (nvJPEG returns nothing then), each
        sample alone, the ones it still refuses on the CPU."""
        try:
            decoded = decode_jpegs([spans[i] for i in chosen], self.device)
        except RuntimeError:
            decoded = []
            for i in chosen:
                try:
                    decoded += decode_jpegs([spans[i]], self.device)
                except RuntimeError as exc:
                    if self.device.type == "cuda":
                        self._tell(keys[i], f"nvJPEG refused it ({_first_line(exc)})")
                    decoded.append(self._on_host(keys[i], spans[i]))
        for i, image in zip(chosen, decoded, strict=True):
            images[i] = image

    def _on_host(self, key: str, span: Tensor) -> Tensor | None:
        """Decode one sample on the CPU and move it to the device; None if it is corrupt
        (logged as the CPU path logs it)."""
        try:
            return decode_on_host(span).to(self.device, non_blocking=True)
        except RuntimeError as exc:
            log.warning("skipping corrupt sample %s (%s)", key, _first_line(exc))
            return None

    def _tell(self, key: str, reason: str) -> None:
        if key not in self._told:
            self._told.add(key)
            log.info("decoding sample %s on the CPU: %s", key, reason)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def check_device_decoding(device: torch.device | str) -> None:
    """Refuse ``--decode gpu`` where torchvision cannot decode JPEGs on ``device`` (a
    torchvision built without nvJPEG), before any work: one tiny JPEG is decoded there.

    Example:
        >>> check_device_decoding("cpu")  # libjpeg-turbo: always there
    """
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(out, format="JPEG")
    probe = torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)
    try:
        decode_jpegs([probe], device)
    except RuntimeError as exc:
        raise UserError(
            f"--decode gpu: torchvision {_torchvision_version()} cannot decode JPEGs on "
            f"{device} ({_first_line(exc)}); install a torchvision built with nvJPEG (the "
            "CUDA wheels of download.pytorch.org are), or leave --decode out to decode in "
            "the data workers"
        ) from None


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__
