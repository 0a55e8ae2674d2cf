"""A source tree listed once: the image files below a folder or S3 prefix, with their
paths relative to it, and the files that are not images by name.

Every layout reads its files from here, so a local folder and an ``s3://`` prefix are
one code path, and a file the layouts do not take is counted and named, never dropped
in silence.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass

from shards import storage
from shards.archives import is_archive, list_archive

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Tree:
    """The files below ``root``: ``images`` as (relative path, size), sorted by path;
    ``others`` the relative paths of files whose names are not image names. ``root``
    may be a tar archive (``shards.archives``): the paths are then those the files would
    have once extracted, ``offsets[i]`` is where image ``i``'s bytes start in it, and
    ``refused`` names what of it could not be read."""

    root: str
    images: list[tuple[str, int]]
    others: list[str]
    offsets: array | None = None
    refused: list[dict[str, str]] | None = None

    def offset(self, position: int) -> int | None:
        """Where image ``position``'s bytes lie in the archive; None in a folder tree."""
        return None if self.offsets is None else self.offsets[position]

    def depths(self) -> set[int]:
        """How many folders deep the images lie (0: directly in the root)."""
        return {name.count("/") for name, _ in self.images}

    def ignored_note(self) -> str | None:
        """A line saying which files the listing left out, or None if none."""
        if not self.others:
            return None
        shown = ", ".join(self.others[:3]) + (", ..." if len(self.others) > 3 else "")
        return (
            f"{len(self.others)} file(s) without an image name ignored ({shown}); image names "
            f"end in {', '.join(sorted(IMAGE_SUFFIXES))}"
        )


def is_image_name(name: str) -> bool:
    """Whether a file is taken as an image by its name (hidden files are not).

    Example:
        >>> is_image_name("2024/IMG_0001.JPG"), is_image_name("notes.txt"), is_image_name(".a.jpg")
        (True, False, False)
    """
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_SUFFIXES


def list_tree(src: str, index_dir: str | None = None) -> Tree:
    """List every file below ``src`` (a folder or a URL such as ``s3://bucket/photos``),
    or in the tar archive ``src`` names (its index kept in ``index_dir``).

    Example:
        >>> tree = list_tree("/data/photos")  # doctest: +SKIP
        >>> tree.images[:2]  # doctest: +SKIP
        [('2024/home/0001.jpg', 183202), ('2024/trip/0001.jpg', 201931)]
    """
    if is_archive(src):
        return _archive_tree(src, index_dir)
    images: list[tuple[str, int]] = []
    others: list[str] = []
    for name, size in storage.list_files(src):
        if is_image_name(name):
            images.append((name, size))
        else:
            others.append(name)
    return Tree(src, images, others)


def _archive_tree(src: str, index_dir: str | None) -> Tree:
    """An archive's files as the folder it would extract to would list them: sorted by
    path, hidden folders left out, a leading ``./`` dropped."""
    listing = list_archive(src, index_dir)
    found = []
    for position, name in enumerate(listing.names):
        name = name.removeprefix("./")
        if name and not storage.in_hidden_folder(name):
            found.append((name, listing.sizes[position], listing.offsets[position]))
    found.sort()
    images: list[tuple[str, int]] = []
    offsets = array("q")
    others: list[str] = []
    for name, size, offset in found:
        if is_image_name(name):
            images.append((name, size))
            offsets.append(offset)
        else:
            others.append(name)
    return Tree(src, images, others, offsets, listing.refused)


def sample_key(name: str) -> str:
    """The sample key of the file at relative path ``name``: the path without its
    image suffix, so ``a/0001.jpg`` and ``b/0001.jpg`` are two samples. WebDataset ends
    a key at the first dot of a member's file name, so dots left in the file name
    (and ``%``, to keep the mapping one-to-one) are percent-encoded.

    Example:
        >>> sample_key("2024/trip/IMG_0001.jpg"), sample_key("a.b/x.2.png")
        ('2024/trip/IMG_0001', 'a.b/x%2E2')
    """
    folder, _, base = name.rpartition("/")
    stem = os.path.splitext(base)[0].replace("%", "%25").replace(".", "%2E")
    return f"{folder}/{stem}" if folder else stem
