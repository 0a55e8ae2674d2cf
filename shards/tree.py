"""A source tree listed once: the image files below a folder or S3 prefix, with their
paths relative to it, and the files that are not images by name.

Every layout reads its files from here, so a local folder and an ``s3://`` prefix are
one code path, and a file the layouts do not take is counted and named, never dropped
in silence.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from itertools import pairwise

from shards import storage
from shards.archives import is_archive, list_archive

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Tree:
    """The files below ``root``: the images' relative paths (``names``, sorted) and sizes
    (``sizes``), and ``others``, the relative paths of files whose names are not image
    names. ``root`` may be a tar archive (``shards.archives``): the paths are then those
    the files would have once extracted, ``offsets[i]`` is where image ``i``'s bytes
    start in it, ``folders`` the folders its inner tars would extract to (an empty one
    included), and ``refused`` names what of it could not be read.

    Columns rather than one (name, size) tuple per image: ImageNet-21k lists 14M images,
    and a tuple with its own size integer is 92 bytes more per image than a name in a
    list and a size in a packed array (bench/shards_plan.py)."""

    root: str
    names: list[str]
    sizes: array
    others: list[str] = field(default_factory=list)
    offsets: array | None = None
    refused: list[dict[str, str]] | None = None
    folders: list[str] | None = None

    @classmethod
    def of(cls, root: str, images: list[tuple[str, int]], others: list[str] | None = None) -> Tree:
        """A tree from (relative path, size) pairs, sorted here.

        Example:
            >>> Tree.of("photos", [("b.jpg", 2), ("a.jpg", 1)]).names
            ['a.jpg', 'b.jpg']
        """
        images = sorted(images)
        names = [name for name, _ in images]
        return cls(root, names, array("q", [size for _, size in images]), list(others or []))

    def __len__(self) -> int:
        return len(self.names)

    def offset(self, position: int) -> int | None:
        """Where image ``position``'s bytes lie in the archive; None in a folder tree."""
        return None if self.offsets is None else self.offsets[position]

    def depths(self) -> set[int]:
        """How many folders deep the images lie (0: directly in the root)."""
        return {name.count("/") for name in self.names}

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
    start = name.rfind("/") + 1  # string methods, not os.path: 14M calls for ImageNet-21k
    dot = name.rfind(".")
    hidden = name.startswith(".", start)
    return dot > start and not hidden and name[dot:].lower() in IMAGE_SUFFIXES


def list_tree(src: str, index_dir: str | None = None) -> Tree:
    """List every file below ``src`` (a folder or a URL such as ``s3://bucket/photos``),
    or in the tar archive ``src`` names (its index kept in ``index_dir``).

    Example:
        >>> tree = list_tree("/data/photos")  # doctest: +SKIP
        >>> tree.names[:2], tree.sizes[:2]  # doctest: +SKIP
        (['2024/home/0001.jpg', '2024/trip/0001.jpg'], array('q', [183202, 201931]))
    """
    if is_archive(src):
        return _archive_tree(src, index_dir)
    tree = Tree(src, [], array("q"))
    for name, size in storage.list_files(src):
        if is_image_name(name):
            tree.names.append(name)
            tree.sizes.append(size)
        else:
            tree.others.append(name)
    return tree


def _archive_tree(src: str, index_dir: str | None) -> Tree:
    """An archive's files as the folder it would extract to would list them: sorted by
    path (the listing is), hidden folders left out. Columns are filled by position, not
    from (name, size, offset) tuples: at 14M members those were 1.8 GB beside the
    listing."""
    listing = list_archive(src, index_dir)
    names = listing.names
    if all(before <= after for before, after in pairwise(names)):
        order: range | list[int] = range(len(names))  # as list_archive returns it
    else:  # not expected: sorted here all the same
        order = sorted(range(len(names)), key=names.__getitem__)
    tree = Tree(src, [], array("q"), [], array("q"), listing.refused, listing.folders)
    sizes, offsets, hidden = listing.sizes, listing.offsets, storage.in_hidden_folder
    add_name, add_size, add_offset = tree.names.append, tree.sizes.append, tree.offsets.append  # type: ignore[union-attr]
    for position in order:  # 14M times for ImageNet-21k
        name = names[position]
        if not name or hidden(name):
            continue
        if is_image_name(name):
            add_name(name)
            add_size(sizes[position])
            add_offset(offsets[position])
        else:
            tree.others.append(name)
    return tree


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
