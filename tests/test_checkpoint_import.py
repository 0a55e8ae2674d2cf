"""`ssl-train import` against TensorFlow itself: official-structure SimCLRv2 networks
built in real TensorFlow (tests/tf_simclr_nets.py, in the separate ``.venv-tf``), saved
as TF1 ``Saver`` checkpoints, TF2 object-graph checkpoints and SavedModels, imported
with ssl-train (no TensorFlow), and compared on the same images: pooled features,
projection-head outputs and logits within 5e-4 of their largest magnitude in float32
and 1e-9 in float64. A deliberately wrong mapping (an SK convolution's two streams
swapped) and ssl-train's own stem padding must both miss those bounds. Then an imported
pretrained network finetunes, teaches a distilled student and is evaluated with the
pipeline's own commands.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from stage_runs import command, run

from shards.sources import imagenet_wnids
from ssl_train.checkpoint_import.importer import CheckpointImportError, import_checkpoint
from ssl_train.export import load_model
from ssl_train.models.resnet import SamePaddingMaxPool, SelectiveKernelConv

from conftest import TinyShards, run_cli

ROOT = Path(__file__).resolve().parents[1]
TF_PYTHON = ROOT / ".venv-tf" / "bin" / "python"
HELPER = ROOT / "tests" / "tf_simclr_nets.py"
FLOAT32_BOUND, FLOAT64_BOUND = 5e-4, 1e-9

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not TF_PYTHON.exists(),
        reason=f"{TF_PYTHON} is missing: run `make tf-env` (TensorFlow in its own venv) first",
    ),
]


def _case(name: str, depth: int, width: int, sk: bool, fmt: str, **head) -> dict:
    return {
        "name": name, "depth": depth, "width": width, "sk": sk, "format": fmt,
        "head_layers": head.get("head_layers", 3), "full_head": head.get("full_head", True),
        "ft_proj_selector": head.get("ft_proj_selector", 0), "classes": head.get("classes", 4),
        "image_size": 64, "seed": len(name) * 7 + depth + width,
    }  # fmt: skip


# Pretrained-like (whole head, linear-eval classifier on the backbone) in every format,
# and a finetuned-like one (head cut after layer 1, classifier reading it).
CASES = [
    _case("r50_1x_tf1", 50, 1, False, "tf1"),
    _case("r50_1x_tf2", 50, 1, False, "tf2"),
    _case(
        "r50_1x_sk_tf1_finetuned",
        50,
        1,
        True,
        "tf1",
        head_layers=1,
        full_head=False,
        ft_proj_selector=1,
    ),
    _case("r50_1x_sk_tf2", 50, 1, True, "tf2"),
    _case("r50_2x_sk_tf1", 50, 2, True, "tf1"),
    _case("r50_2x_sk_savedmodel", 50, 2, True, "savedmodel", classes=1000),  # as released
    {**_case("r50_1x_se_tf1", 50, 1, False, "tf1"), "extra": {"base_model/conv2d_60/bias": [64]}},
]
EXPECTED = {  # preset, head layers built, kept, classifier input layer
    "r50_1x_tf1": ("r50_1x_sk0", 3, 3, 0),
    "r50_1x_tf2": ("r50_1x_sk0", 3, 3, 0),
    "r50_1x_sk_tf1_finetuned": ("r50_1x_sk1", 2, 1, 1),
    "r50_1x_sk_tf2": ("r50_1x_sk1", 3, 3, 0),
    "r50_2x_sk_tf1": ("r50_2x_sk1", 3, 3, 0),
    "r50_2x_sk_savedmodel": ("r50_2x_sk1", 3, 3, 0),
}


CLASSES = {case["name"]: case["classes"] for case in CASES}


@pytest.fixture(scope="module")
def networks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cases' checkpoints and TensorFlow's outputs (2 GB, removed afterwards)."""
    out = tmp_path_factory.mktemp("tf-simclr")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(TF_PYTHON), str(HELPER), str(out), json.dumps(CASES)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    yield out
    shutil.rmtree(out, ignore_errors=True)  # pytest keeps three runs' temp dirs


@pytest.fixture(scope="module")
def imported(networks: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Each case imported by ssl-train (1.9 GB of safetensors, removed afterwards)."""
    root = tmp_path_factory.mktemp("imported")
    yield {name: _import(networks / name, root / name) for name in EXPECTED}
    shutil.rmtree(root, ignore_errors=True)


def _import(src: Path, out: Path) -> Path:
    import_checkpoint(str(src), str(out))
    return out


def _errors(model: torch.nn.Module, folder: Path, suffix: str) -> dict[str, float]:
    """Largest |ssl-train - TensorFlow| over the largest |TensorFlow|, per output."""
    dtype = torch.float32 if suffix == "f32" else torch.float64
    model = model.to(dtype).eval()
    images = torch.from_numpy(np.load(folder / f"images_{suffix}.npy")).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(images)
    errors = {}
    for field, ours in (
        ("features", out.features),
        ("projection", out.projection),
        ("logits", out.logits),
    ):
        theirs = np.load(folder / f"{field}_{suffix}.npy")
        assert ours.shape == theirs.shape, field
        errors[field] = float(np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max())
    return errors


@pytest.mark.parametrize("name", list(EXPECTED))
def test_imported_network_computes_tensorflows_function(
    name: str, networks: Path, imported: dict[str, Path]
) -> None:
    model, config = load_model(str(imported[name]))
    preset, head_layers, kept, layer = EXPECTED[name]
    assert (config["preset"], config["head_layers"], config["kept_head_layers"]) == (
        preset,
        head_layers,
        kept,
    )
    classes = CLASSES[name]
    assert (config["from_proj_layer"], config["num_classes"], config["stem_pool"]) == (
        layer,
        classes,
        "tensorflow",
    )
    # An ImageNet classifier's labels are TFDS's: the sorted wnids. Others are unknown.
    assert config.get("classes") == (imagenet_wnids() if classes == 1000 else None)
    assert isinstance(model.backbone.maxpool, SamePaddingMaxPool)
    float32 = _errors(model, networks / name, "f32")
    assert max(float32.values()) < FLOAT32_BOUND, float32
    float64 = _errors(model, networks / name, "f64")
    assert max(float64.values()) < FLOAT64_BOUND, float64


def test_a_wrong_mapping_or_torchvisions_stem_padding_misses_the_bounds(
    networks: Path, imported: dict[str, Path]
) -> None:
    """The comparison can fail: swapping every SK convolution's two streams (a plausible
    misreading of TF's split) or keeping torchvision's max-pool padding is caught."""
    name = "r50_1x_sk_tf2"
    swapped, _ = load_model(str(imported[name]))
    with torch.no_grad():
        for module in swapped.modules():
            if isinstance(module, SelectiveKernelConv):
                for tensor in (module.conv.weight, module.bn.weight, module.bn.bias,
                               module.bn.running_mean, module.bn.running_var):  # fmt: skip
                    first, second = tensor.chunk(2, dim=0)
                    tensor.copy_(torch.cat([second, first]))
    assert max(_errors(swapped, networks / name, "f32").values()) > 10 * FLOAT32_BOUND
    padded, _ = load_model(str(imported[name]))
    padded.backbone.maxpool = torch.nn.MaxPool2d(3, 2, 1)
    assert max(_errors(padded, networks / name, "f32").values()) > 10 * FLOAT32_BOUND


def test_variables_of_another_architecture_are_named(networks: Path, tmp_path: Path) -> None:
    """A checkpoint with a weight ssl-train's network has no place for (the bias of a
    squeeze-excitation 1x1 convolution, as the official code's SE option adds) is
    refused, naming it, and nothing is written; optimizer slots, moving averages and
    the step counter are skipped without complaint."""
    from ssl_train.checkpoint_import.tf_checkpoint import TFCheckpoint

    plain = TFCheckpoint(str(networks / "r50_1x_tf1")).names()
    assert "global_step" in plain and any(n.endswith("/Momentum") for n in plain)
    assert any(n.endswith("/ExponentialMovingAverage") for n in plain)
    out = tmp_path / "out"
    with pytest.raises(CheckpointImportError, match="base_model/conv2d_60/bias") as caught:
        import_checkpoint(str(networks / "r50_1x_se_tf1"), str(out))
    assert "not an architecture ssl-train has" in str(caught.value)
    assert not out.exists()


def test_an_imported_checkpoint_finetunes_distills_and_evaluates(
    tiny_shards: TinyShards, networks: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "r50"
    result = run_cli("import", networks / "r50_1x_tf1", model_dir, tool="ssl-train", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "r50_1x_sk0" in result.stdout
    common = ["--image-size", "16", "--workers", "0", "--global-batch-size", "8"]
    run(
        command("finetune", "--data", str(tiny_shards.train), "--pretrained", str(model_dir),
                "--run-dir", str(tmp_path / "ft"), "--max-steps", "2", *common),
        tmp_path / "ft.log",
    )  # fmt: skip
    finetuned = json.loads((tmp_path / "ft" / "final" / "config.json").read_text())
    assert (finetuned["preset"], finetuned["stem_pool"]) == ("r50_1x_sk0", "tensorflow")
    run(
        command("distill", "--data", str(tiny_shards.train), "--teacher", str(model_dir),
                "--run-dir", str(tmp_path / "student"), "--student", "tiny_student",
                "--max-steps", "2", *common),
        tmp_path / "distill.log",
    )  # fmt: skip
    student = json.loads((tmp_path / "student" / "final" / "config.json").read_text())
    assert student["preset"] == "tiny_student" and student["stage"] == "distill"
    result = run_cli(
        "eval", model_dir, "--data", tiny_shards.test, "--image-size", "32", "--workers", "0",
        tool="ssl-train", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["samples"] == 40


def test_an_imagenet_classifier_refuses_data_with_its_classes_in_another_order(
    tiny_shards: TinyShards, imported: dict[str, Path], tmp_path: Path
) -> None:
    """An imported ImageNet classifier knows its labels (sorted wnids): evaluating it, or
    distilling from it, on shards whose class list has another order is refused with the
    first differing class; the same images sharded with ImageNet's order are accepted."""
    from shards.create import CreateOptions, create

    model_dir = imported["r50_2x_sk_savedmodel"]
    src = tiny_shards.test.parent / "src-test"  # 4 wnids x 10 images
    (tmp_path / "reversed.txt").write_text("\n".join(reversed(imagenet_wnids())) + "\n")
    for name, classes in (("imagenet", "imagenet1k"), ("reversed", str(tmp_path / "reversed.txt"))):
        create(CreateOptions(src=str(src), dest=str(tmp_path / name), classes=classes, workers=1))
    common = ["--image-size", "32", "--workers", "0"]
    result = run_cli(
        "eval", model_dir, "--data", tmp_path / "reversed", *common, tool="ssl-train", timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert (
        "1000 classes are not the model's 1000 in the same order (first difference at class 0)"
        in result.stderr
    )
    result = run_cli(
        "eval", model_dir, "--data", tmp_path / "imagenet", *common, tool="ssl-train", timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["samples"] == 40
    distill = {
        name: run_cli(
            "distill",
            "--data",
            tmp_path / name,
            "--teacher",
            model_dir,
            "--run-dir",
            tmp_path / f"student-{name}",
            "--student",
            "tiny_student",
            "--check-only",
            "--global-batch-size",
            "8",
            tool="ssl-train",
            timeout=300,
        )
        for name in ("reversed", "imagenet")
    }
    assert distill["imagenet"].returncode == 0, distill["imagenet"].stderr
    refused = distill["reversed"]
    assert refused.returncode == 2, refused.stderr
    first, last = imagenet_wnids()[0], imagenet_wnids()[-1]
    assert f"classifier's class 0 is {first!r}" in refused.stderr, refused.stderr
    assert f"'s is {last!r}" in refused.stderr and "Traceback" not in refused.stderr


def test_a_classifier_input_the_checkpoint_cannot_have_is_refused(
    networks: Path, tmp_path: Path
) -> None:
    """--from-proj-layer overrides the default, but only to a layer whose width the
    classifier's kernel fits; the CLI says so in one line and writes nothing."""
    src = networks / "r50_1x_tf1"  # whole 3-layer head: layer 3 is 128 wide, the rest 2048
    for layer, message in ((3, "classifier reads 2048 features"), (4, "choose 0 to 3")):
        result = run_cli(
            "import", src, tmp_path / "out", "--from-proj-layer", str(layer), tool="ssl-train"
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()
    result = run_cli("import", src, tmp_path / "out", "--from-proj-layer", "1", tool="ssl-train")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["from_proj_layer"] == 1


def test_import_from_a_folder_in_object_storage_to_object_storage(
    networks: Path, imported: dict[str, Path], s3_bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SRC and OUT_DIR may both be URLs: a TF2 checkpoint folder uploaded to S3 (found by
    its only .index) imports into an S3 model folder that loads to the same weights."""
    from shards import storage

    fs, _ = storage.filesystem(s3_bucket.url)
    for path in (networks / "r50_1x_tf2").glob("ckpt-1.*"):
        fs.put_file(str(path), f"{s3_bucket.name}/releases/r50/{path.name}")
    out = f"{s3_bucket.url}/models/r50"
    reads: list[int] = []
    monkeypatch.setattr(
        storage, "_listeners", [lambda event, n: event == "read_bytes" and reads.append(n)]
    )
    config = import_checkpoint(f"{s3_bucket.url}/releases/r50/", out)
    # Neighbouring tensors are fetched together: a handful of reads (index, object graph,
    # then up to 64 MB each), not one per tensor of the R50's few hundred.
    data = (networks / "r50_1x_tf2" / "ckpt-1.data-00000-of-00001").stat().st_size
    assert len(reads) <= 2 + -(-data // (64 << 20)) + 1, (len(reads), reads)
    assert config["imported_from"].endswith("/releases/r50/ckpt-1")
    from_s3, _ = load_model(out)
    local, _ = load_model(str(imported["r50_1x_tf2"]))
    for key, value in local.state_dict().items():
        assert torch.equal(from_s3.state_dict()[key], value), key
