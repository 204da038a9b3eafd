"""Stage 2 with the frozen lower blocks on the inference engine.

With the top N blocks unfrozen, the stem and the blocks below them still run forward on every batch, but nothing
in them learns and no gradient flows through them: they are pure inference, which OpenVINO runs ~4x faster than
eager PyTorch on CPU (the feature engine's measurements). So stage 2 sends each batch through the compiled
frozen part and only the unfrozen top through PyTorch's autograd. Their output is the same function of the input
(checked against eager fp32 on the first batch, as the feature engine is), so training follows the same path.

Only timm's EfficientNet family (EfficientNet, EfficientNet-Lite, MobileNetV2: every backbone with offline
weights), whose `forward_features` is stem -> blocks -> head convolution, is split; other backbones, `--unfreeze
all` and CUDA keep the whole network in PyTorch, and so do blocks from the first one that drops paths at random
(stochastic depth), which a compiled engine would not.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from timm.models.efficientnet import EfficientNet
from torch import nn

from transferkit.features.extract import Engine, inference_engine
from transferkit.models.classifier import Classifier
from transferkit.progress import Reporter


class FrozenStem(nn.Module):
    """The stem and the first `blocks` blocks of a timm EfficientNet: what stage 2 does not train."""

    def __init__(self, backbone: EfficientNet, blocks: int) -> None:
        super().__init__()
        self.conv_stem, self.bn1 = backbone.conv_stem, backbone.bn1
        self.blocks = backbone.blocks[:blocks]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(images)))


def frozen_blocks(backbone: nn.Module) -> int:
    """How many leading blocks have nothing to train and nothing random (stochastic depth): 0 when the stem trains
    or the backbone is of another family."""
    if not isinstance(backbone, EfficientNet) or any(p.requires_grad for p in FrozenStem(backbone, 0).parameters()):
        return 0
    count = 0
    for block in backbone.blocks:
        stochastic = any(isinstance(m, DropPath) and m.drop_prob > 0 for m in block.modules())
        if stochastic or any(p.requires_grad for p in block.parameters()):
            break
        count += 1
    return count


class FrozenPrefixClassifier(nn.Module):
    """The classifier whose frozen stem and lower blocks run on a compiled engine, chosen on the first batch (its
    output must match eager fp32 there); the rest runs in PyTorch, so gradients reach every trainable weight."""

    def __init__(self, model: Classifier, blocks: int, engine: str, reporter: Reporter) -> None:
        super().__init__()
        self.model, self.blocks = model, blocks
        self.engine, self._reporter = engine, reporter
        self.engine_name = ""  # the engine chosen on the first batch
        self._run: Engine | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        backbone = self.model.backbone
        if self._run is None:
            stem = FrozenStem(backbone, self.blocks)
            modes = {module: module.training for module in stem.modules()}
            self._run, self.engine_name = inference_engine(stem, images, self.engine, self._reporter,
                                                           f"frozen blocks (stem + {self.blocks})")
            for module, training in modes.items():  # the parity check ran them in inference mode
                module.train(training)
        hidden = self._run(images).contiguous(memory_format=torch.channels_last)
        hidden = backbone.blocks[self.blocks :](hidden)
        features = backbone.bn2(backbone.conv_head(hidden))
        return self.model.head(backbone.forward_head(features, pre_logits=True))


def with_frozen_prefix(model: Classifier, engine: str, reporter: Reporter) -> nn.Module:
    """What stage 2's batches go through: the classifier with its frozen prefix compiled when there is one to
    compile (CPU, EfficientNet family, top blocks unfrozen, engine not `torch`, last-layer features only), else the
    classifier itself."""
    blocks = frozen_blocks(model.backbone)
    if blocks == 0 or model.depths or engine == "torch" or next(model.parameters()).is_cuda:
        return model
    return FrozenPrefixClassifier(model, blocks, engine, reporter)
