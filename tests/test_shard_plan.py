"""The global plan (issue 35's 14M-image plan): items sorted by key, then shuffled by the
seed, then cut into shards, from columns rather than one object per image. The order is
the same whether the keys rise with the sorted names (ImageNet's: no sort needed) or
not (every key made and sorted), and two files with one key are refused either way."""

from __future__ import annotations

import random
from array import array

import pytest

from shards.create import plan_set
from shards.errors import ShardsError
from shards.sources import Items


def _items(names: list[str], rule: str) -> Items:
    names = sorted(names)
    sizes = array("q", [1_000 + 7 * i for i in range(len(names))])
    return Items("/src", names, sizes, array("i", [0] * len(names)), key_rule=rule)


def _planned_keys(items: Items, seed: int, shard_samples: int) -> list[list[str]]:
    plan = plan_set(items, seed, "train", None, shard_samples)
    return [[item.key for item in plan.shard(k).items] for k in range(len(plan))]


@pytest.mark.parametrize(
    "extra",
    [[], ["n01/n01_3-a.JPEG", "n01/n01_3+b.JPEG"]],
    ids=["keys-rise-with-names", "keys-out-of-name-order"],
)
@pytest.mark.parametrize("seed", [0, 11])
def test_the_plan_is_the_keys_sorted_shuffled_by_the_seed_and_cut(
    extra: list[str], seed: int
) -> None:
    names = [f"n0{c}/n0{c}_{i}.JPEG" for c in range(1, 4) for i in range(25)] + extra
    items = _items(names, "stem")
    keys = sorted(name.rsplit("/", 1)[1].rsplit(".", 1)[0] for name in names)
    if extra:  # the case the fast path cannot take: a key sorts apart from its name
        assert [items.key(i) for i in range(len(items))] != keys
    random.Random(seed).shuffle(keys)
    shards = _planned_keys(items, seed, shard_samples=8)
    assert [key for shard in shards for key in shard] == keys
    assert [len(shard) for shard in shards] == [8] * (len(keys) // 8) + [len(keys) % 8] * (
        len(keys) % 8 > 0
    )


@pytest.mark.parametrize(
    "names",
    [["a/x.jpg", "b/x.jpg", "c/y.jpg"], ["a/x-1.jpg", "a/x.jpg", "b/x.jpg"]],
    ids=["keys-rise", "keys-out-of-name-order"],
)
def test_two_files_with_one_key_are_refused_naming_both(names: list[str]) -> None:
    with pytest.raises(ShardsError, match=r"same sample key 'x': a/x\.jpg and b/x\.jpg"):
        plan_set(_items(names, "stem"), 0, "train", None, 2)


def test_shards_cut_by_size_count_each_file_with_its_tar_overhead() -> None:
    items = _items([f"c/{i}.jpg" for i in range(10)], "folder")
    plan = plan_set(items, 0, "train", 3 * (1_100 + 3 * 512), None)
    sizes = [[item.size for item in plan.shard(k).items] for k in range(len(plan))]
    assert all(sum(s) + 3 * 512 * len(s) <= 3 * (1_100 + 3 * 512) for s in sizes)
    assert sorted(size for shard in sizes for size in shard) == list(items.sizes)
    assert len(plan) == 4 and plan.name(3) == "train-000003.tar"
