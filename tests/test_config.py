"""Configuration layering, recipes, schedules and augmentation presets."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

from transferkit.config import resolve_config
from transferkit.data.transforms import Preprocess, eval_transform, train_transform
from transferkit.errors import UserError
from transferkit.options import AUGMENT_PRESETS
from transferkit.recipes import RECIPES
from transferkit.training.optim import build_optimizer, build_scheduler, lr_factor


def test_recipes_reproduce_the_tutorials():
    urban = resolve_config("urban-rural")
    assert (urban.backbone, urban.batch_size, urban.epochs_frozen, urban.epochs_finetune) == ("resnet50", 8, 20, 10)
    assert (urban.finetune_optimizer, urban.finetune_lr, urban.unfreeze, urban.augment) == ("rmsprop", 1e-5, "all",
                                                                                          "light")
    assert urban.head_hidden == [] and urban.binary_logit
    cats = resolve_config("cats-dogs")
    assert cats.head_hidden == [1024, 1024, 1024, 512] and not cats.binary_logit and cats.epochs_finetune == 0
    chess = resolve_config("chess")
    assert (chess.head_dropout, chess.head_batchnorm, chess.adam_eps, chess.lr_decay) == (0.3, True, 0.01, 1e-4)
    cars = resolve_config("xception-cars")
    assert cars.backbone == "xception" and cars.head_hidden == [1024] and cars.finetune_lr == 1e-4
    assert set(RECIPES) == {"default", "urban-rural", "cats-dogs", "chess", "xception-cars", "accurate"}
    # the tutorials' GlobalAveragePooling2D; everything else pools CNN maps by their maximum (decision 0298)
    assert {recipe: resolve_config(recipe).pool for recipe in RECIPES} == {
        "default": "auto", "urban-rural": "avg", "cats-dogs": "avg", "chess": "avg", "xception-cars": "avg",
        "accurate": "auto"}
    accurate = resolve_config("accurate")
    assert accurate.members() == [("tf_efficientnet_lite0", None), ("tf_efficientnet_lite2", None)]
    assert accurate.epochs_finetune == 0 and accurate.head_fit == "exact"
    assert resolve_config("accurate", backbone="resnet50").members() == [("resnet50", None)]  # a flag beats it


def test_layering_defaults_recipe_file_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("recipe: chess\nepochs_frozen: 4\nbatch_size: 12\n")
    config = resolve_config(None, str(tmp_path / "c.yaml"), batch_size=6, lr=None)
    assert config.recipe == "chess" and config.head_batchnorm  # from the recipe named in the file
    assert config.epochs_frozen == 4  # the file beats the recipe
    assert config.batch_size == 6  # a flag beats the file
    assert config.lr == RECIPES["chess"]["lr"]  # a flag not given (None) changes nothing


@pytest.mark.parametrize(
    "values",
    [{"optimizer": "adagrad"}, {"schedule": "step"}, {"val_split": 0.0}, {"unfreeze": "some"},
     {"augment_options": {"twirl": 3}}, {"epochs_frozen": 0, "epochs_finetune": 0}, {"crop_pct": 1.5},
     # each of these crashed, or ran on quietly, before a rule named it
     {"seed": -1}, {"seed": 2**32}, {"label_smoothing": 2.0}, {"patience": -1}, {"momentum": 1.5},
     {"weight_decay": -1.0}, {"warmup_epochs": -1.0}, {"head_hidden": [0]}, {"adam_eps": 0.0},
     {"image_size": 100_000}],  # the last exhausted memory in a loader worker: a traceback after its OOM kill
)
def test_bad_values_are_user_errors(values):
    with pytest.raises(UserError, match="bad configuration"):
        resolve_config(**values)


def test_unknown_keys_are_rejected(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\n")
    with pytest.raises(UserError, match="epochs"):
        resolve_config(config_file=str(tmp_path / "c.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        resolve_config(config_file=str(tmp_path / "list.yaml"))


def test_schedules():
    assert [round(lr_factor("constant", s, 100, 4, 0), 2) for s in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert lr_factor("cosine", 0, 100, 0, 0) == 1.0 and lr_factor("cosine", 100, 100, 0, 0) == pytest.approx(0)
    assert lr_factor("cosine", 50, 100, 0, 0) == pytest.approx(0.5)
    assert lr_factor("inverse_time", 1000, 10_000, 0, 1e-4) == pytest.approx(1 / 1.1)
    assert lr_factor("onecycle", 100, 100, 30, 0) == pytest.approx(1e-3)


def test_optimizer_param_groups_and_warmup():
    config = resolve_config(warmup_epochs=1.0, schedule="cosine")
    head, body = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer("sgd", [{"params": [head], "lr": 1e-3}, {"params": [body], "lr": 1e-4}], config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=10, epochs=3)
    first = [g["lr"] for g in optimizer.param_groups]
    assert first == pytest.approx([1e-3 / 11, 1e-4 / 11])  # warmup starts low, ratio between groups kept
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # warmup over: the peak


def lite0_preprocess() -> Preprocess:
    return Preprocess.from_timm_config(timm.create_model("tf_efficientnet_lite0").pretrained_cfg)


def test_preprocessing_comes_from_the_backbone_config():
    pre = lite0_preprocess()
    assert (pre.image_size, pre.interpolation, pre.crop_pct, pre.mean) == (224, "bicubic", 0.875, (0.5, 0.5, 0.5))
    assert pre.resize_size == 256
    assert Preprocess.from_dict(pre.to_dict()) == pre


def test_light_preset_has_the_tutorial_knobs_and_randomises():
    light = AUGMENT_PRESETS["light"]
    assert (light.rotation, light.zoom, light.width_shift, light.height_shift, light.horizontal_flip) == (
        10, 0.1, 0.1, 0.1, True)
    image = Image.effect_mandelbrot((96, 96), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    transform = train_transform(lite0_preprocess(), light)
    torch.manual_seed(0)
    assert not torch.equal(transform(image), transform(image))


def test_no_augmentation_equals_the_eval_transform():
    image = Image.effect_mandelbrot((80, 60), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    pre = lite0_preprocess()
    assert torch.equal(train_transform(pre, AUGMENT_PRESETS["none"])(image), eval_transform(pre)(image))
    assert eval_transform(pre)(image).shape == (3, 224, 224)


def test_strong_preset_and_samplewise_center():
    import dataclasses

    image = Image.effect_mandelbrot((80, 60), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    pre = lite0_preprocess()
    assert train_transform(pre, AUGMENT_PRESETS["strong"])(image).shape == (3, 224, 224)
    centred = train_transform(pre, dataclasses.replace(AUGMENT_PRESETS["light"], samplewise_center=True))(image)
    assert abs(float(centred.mean())) < 1e-5


def test_finetune_epochs_auto_fine_tunes_on_a_gpu_or_a_larger_training_split():
    """Decision 0303: on a CPU the stage lost a little on small training sets and gained a little on larger ones."""
    default = resolve_config()
    assert default.epochs_finetune == "auto"
    assert default.for_device("cpu", 699).epochs_finetune == 0
    assert default.for_device("cpu", 700).epochs_finetune == 3
    assert default.for_device("cuda", 20).epochs_finetune == 3
    assert resolve_config(epochs_frozen=0).for_device("cpu", 20).epochs_finetune == 3  # fine-tuning is all there is
    assert resolve_config(epochs_finetune=5).for_device("cpu", 20).epochs_finetune == 5
    assert resolve_config(recipe="xception-cars").for_device("cpu", 20).epochs_finetune == 5
    with pytest.raises(UserError, match="epochs_finetune must be auto or 0 or more"):
        resolve_config(epochs_finetune="some")
    with pytest.raises(UserError, match="nothing to train"):
        resolve_config(epochs_frozen=0, epochs_finetune=0)
