"""What the Python API's `Run.predict` and `Run.evaluate` accept as a user writes them: a path or a list, `str` or
`Path`, nothing at all; a bad split is a UserError naming the choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_class_folders
from transferkit import api
from transferkit.errors import UserError
from transferkit.runs.run import Run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str) -> Run:
    root = tmp_path_factory.mktemp("api")
    data = make_class_folders(root / "data", classes=2)
    return api.train(data, root / "run", backbone="test_efficientnet", weights=tiny_weights, image_size=32,
                     batch_size=8, workers=0, epochs_finetune=0, augment="none", quiet=True)


def test_predict_takes_a_path_or_a_list_of_str_or_path(trained: Run) -> None:
    image = next((trained.path.parent / "data").rglob("*.png"))
    as_list, _ = trained.predict([str(image)])
    assert trained.predict(image)[0] == trained.predict(str(image))[0] == trained.predict([image])[0] == as_list
    assert len(as_list) == 1 and as_list[0]["path"] == str(image)


def test_predict_on_nothing_is_nothing(trained: Run) -> None:
    assert trained.predict([]) == ([], [])


def test_an_unknown_split_is_a_user_error(trained: Run) -> None:
    with pytest.raises(UserError, match="unknown split 'nope': choose one of train, val, test or all"):
        trained.evaluate(Path(trained.path.parent / "data"), split="nope", write=False)
