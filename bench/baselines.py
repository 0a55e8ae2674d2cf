"""Baselines the benchmarks set ssl-train against, defined once."""

from __future__ import annotations

import io
from collections.abc import Callable


def torchvision_simclr(samples: list[bytes]) -> Callable[[], None]:
    """The standard per-image SimCLR pipeline (torchvision v1 transforms on PIL): what a
    DataLoader worker does per sample without ssl-train's split of the work. Returns a
    function that runs it over ``samples`` (decode, then RandomResizedCrop, flip,
    ColorJitter, grayscale, GaussianBlur, ToTensor, twice per image) with one torch
    thread, as a worker has.

    Example:
        >>> from shards.images import encode_jpeg
        >>> from PIL import Image
        >>> torchvision_simclr([encode_jpeg(Image.new("RGB", (64, 48)))])()
    """
    import torch
    from PIL import Image
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.RandomResizedCrop(224),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=0.5),
            T.ToTensor(),
        ]
    )

    def run() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for jpeg in samples:
                img = Image.open(io.BytesIO(jpeg)).convert("RGB")
                transform(img), transform(img)
        finally:
            torch.set_num_threads(threads)

    return run
