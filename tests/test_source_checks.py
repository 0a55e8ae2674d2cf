"""A distillation teacher must classify --data's classes in --data's order: what
``check_teacher`` accepts and the one-line reason for each refusal."""

from __future__ import annotations

import pytest

from ssl_train.errors import UserError
from ssl_train.stages.config import StageConfig
from ssl_train.stages.tasks import check_teacher

DATA_CLASSES = ["n01", "n02", "n03"]


def distill_config() -> StageConfig:
    return StageConfig.for_stage(
        "distill", data="s3://b/train", run_dir="/r", teacher="s3://b/runs/teacher"
    )


def teacher_config(classes: list[str] | None, num_classes: int = 3) -> dict:
    saved: dict = {"num_classes": num_classes}
    if classes is not None:
        saved["classes"] = classes
    return saved


@pytest.mark.parametrize("recorded", [DATA_CLASSES, None])  # None: an older export
def test_a_teacher_with_the_same_classes_or_none_recorded_is_accepted(recorded) -> None:
    check_teacher(distill_config(), teacher_config(recorded), list(DATA_CLASSES))


@pytest.mark.parametrize(
    "saved, message",
    [
        (teacher_config(None, num_classes=4), "has no classifier for the 3 classes of --data"),
        (
            teacher_config(["n01", "n03", "n02"]),
            "its classifier's class 1 is 'n03', --data s3://b/train's is 'n02'",
        ),
        (teacher_config(["n01", "n02"]), "names 2 classes for 3 outputs: the file is damaged"),
    ],
)
def test_a_teacher_that_does_not_fit_the_data_is_refused(saved: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as error:
        check_teacher(distill_config(), saved, list(DATA_CLASSES))
    assert str(error.value).startswith("--teacher s3://b/runs/teacher")
