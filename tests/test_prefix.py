"""Stage 2's frozen stem and lower blocks on the inference engine: same outputs, same gradients, same training."""

from __future__ import annotations

import timm
import torch
from safetensors.torch import load_file

from transferkit import api
from transferkit.models.classifier import HeadSpec, freeze_backbone, new_classifier, set_train_mode, unfreeze
from transferkit.progress import Reporter
from transferkit.task.kinds import MultiClass
from transferkit.training.prefix import FrozenPrefixClassifier, frozen_blocks, with_frozen_prefix


def classifier(name: str = "test_efficientnet", top_blocks: str = "1", **kwargs):
    torch.manual_seed(0)
    model = new_classifier(timm.create_model(name, **kwargs), 3, HeadSpec())
    model.to(memory_format=torch.channels_last)
    freeze_backbone(model)
    unfreeze(model, top_blocks)
    return model


def test_frozen_blocks_are_those_below_the_unfrozen_top():
    # test_efficientnet: 5 blocks; its coarse groups are the stem, blocks 0-3, and block 4 with the head convolution
    assert [frozen_blocks(classifier(top_blocks=n).backbone) for n in ("1", "2", "3")] == [4, 3, 2]
    assert frozen_blocks(classifier(top_blocks="all").backbone) == 0
    # stochastic depth: timm gives block 0 a drop rate of 0 and later blocks more; a compiled engine would not drop
    assert frozen_blocks(classifier(drop_path_rate=0.2).backbone) == 1


def test_nothing_to_compile_keeps_the_classifier():
    quiet = Reporter(quiet=True)
    for model, engine in ((classifier(top_blocks="all"), "auto"), (classifier(), "torch"),
                          (classifier("test_resnet"), "auto")):  # another family: forward_features is not split
        assert with_frozen_prefix(model, engine, quiet) is model


def test_same_logits_and_gradients_as_the_whole_network_in_pytorch():
    model = classifier(top_blocks="2")
    fast = with_frozen_prefix(model, "auto", Reporter(quiet=True))
    assert isinstance(fast, FrozenPrefixClassifier)
    images = torch.randn(6, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    criterion = MultiClass(["a", "b", "c"]).loss()
    grads = []
    for module in (model, fast):
        set_train_mode(model, train_backbone_bn=False)
        model.zero_grad(set_to_none=True)
        criterion(module(images), targets).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert fast.engine_name == "openvino"
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("backbone.blocks.3") for n in grads[0])
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-5, rtol=1e-3), name
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    # the parity check's inference mode does not leak into training: frozen batch-norm stays in inference mode
    # and the trainable top keeps the train mode set_train_mode gave it
    assert not model.backbone.bn1.training and model.head.training
    fast.eval()
    with torch.inference_mode():
        assert torch.allclose(fast(images), model(images), atol=1e-5)


def test_training_with_the_compiled_prefix_matches_pytorch(dataset, tmp_path, fast):
    options = {**fast, "epochs_frozen": 2, "epochs_finetune": 2, "unfreeze": "2"}
    runs = {engine: api.train(dataset, tmp_path / engine, feature_engine=engine, **options)
            for engine in ("auto", "torch")}
    compiled, eager = (load_file(str(runs[e].path / "model.safetensors")) for e in ("auto", "torch"))
    trained = [k for k in eager if k.startswith(("head", "backbone.blocks.3", "backbone.blocks.4"))]
    assert trained and max(float((compiled[k] - eager[k]).abs().max()) for k in trained) < 1e-3
    assert runs["auto"].metrics["confusion_matrix"] == runs["torch"].metrics["confusion_matrix"]
    history = [(runs[e].path / "history.csv").read_text().splitlines() for e in ("auto", "torch")]
    assert [line.split(",")[:2] for line in history[0]] == [line.split(",")[:2] for line in history[1]]
