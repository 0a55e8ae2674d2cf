"""A labels file for your own images: which class each labelled image has.

Two formats, told apart by the first character: CSV rows ``path,class`` (a header row
naming the columns is optional) or JSON lines ``{"path": ..., "label": ...}``. The path
is the image's path relative to the source folder or prefix (``2024/trip/0001.jpg``)
or its sample key (``2024/trip/0001``). ImageNet's own validation labels
(``LOC_val_solution.csv``, the devkit's ground truth) are read by ``sources``.
"""

from __future__ import annotations

import csv
import io
import json

from shards import storage
from shards.errors import ShardsError

_PATH_COLUMNS = ("path", "file", "filename", "image", "key", "name")
_CLASS_COLUMNS = ("label", "class", "category", "class_name")


def is_imagenet_val_labels(text: str) -> bool:
    """Whether a labels file is ImageNet's validation ground truth rather than ours:
    ``LOC_val_solution.csv`` (columns ImageId, PredictionString) or the devkit's file of
    one class id per line.

    Example:
        >>> is_imagenet_val_labels("ImageId,PredictionString\\n"), is_imagenet_val_labels("490\\n361\\n")
        (True, True)
        >>> is_imagenet_val_labels("path,label\\na.jpg,cat\\n")
        False
    """
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return ("ImageId" in first and "PredictionString" in first) or first.isdigit()


def read_text(spec: str) -> str:
    """The labels file's text (a local path or a URL), with a clear error if absent."""
    if storage.size_or_none(spec) is None:
        raise ShardsError(f"--labels {storage.redact(spec)}: no such file")
    try:
        return storage.read_bytes(spec).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ShardsError(f"--labels {storage.redact(spec)}: not UTF-8 text ({exc})") from None


def read_labels(spec: str, text: str | None = None) -> dict[str, str]:
    """Image path (or key) -> class name, from a CSV or JSON-lines labels file.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
        ...     _ = f.write("path,label\\n2024/trip/0001.jpg,beach\\n")
        >>> read_labels(f.name)
        {'2024/trip/0001.jpg': 'beach'}
    """
    where = f"--labels {storage.redact(spec)}"
    text = read_text(spec) if text is None else text  # ``text``: the file, read already
    stripped = text.lstrip()
    rows = _json_rows(text, where) if stripped.startswith("{") else _csv_rows(text, where)
    labels: dict[str, str] = {}
    for line, path, label in rows:
        path = path.strip().removeprefix("./")
        label = label.strip()
        if not path or not label:
            raise ShardsError(f"{where}: line {line} has an empty path or class")
        if labels.setdefault(path, label) != label:
            raise ShardsError(
                f"{where}: line {line} gives {path} the class {label!r}, an earlier line "
                f"{labels[path]!r}; keep one"
            )
    if not labels:
        raise ShardsError(f"{where}: the file labels no images")
    return labels


def _csv_rows(text: str, where: str) -> list[tuple[int, str, str]]:
    rows: list[tuple[int, str, str]] = []
    for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) < 2:
            raise ShardsError(f"{where}: line {line} has {len(row)} column; each row is path,class")
        if not rows and line == 1 and _is_header(row):
            continue
        rows.append((line, row[0], row[1]))
    return rows


def _is_header(row: list[str]) -> bool:
    first, second = row[0].strip().lower(), row[1].strip().lower()
    return first in _PATH_COLUMNS and second in _CLASS_COLUMNS


def _json_rows(text: str, where: str) -> list[tuple[int, str, str]]:
    rows: list[tuple[int, str, str]] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise ShardsError(f"{where}: line {line} is not JSON ({exc})") from None
        path = next(
            (record[k] for k in _PATH_COLUMNS if isinstance(record, dict) and k in record), None
        )
        label = next(
            (record[k] for k in _CLASS_COLUMNS if isinstance(record, dict) and k in record), None
        )
        if not isinstance(path, str) or label is None or isinstance(label, (dict, list)):
            raise ShardsError(
                f'{where}: line {line} needs a "path" and a "label", e.g. '
                '{"path": "2024/trip/0001.jpg", "label": "beach"}'
            )
        rows.append((line, path, str(label)))
    return rows
