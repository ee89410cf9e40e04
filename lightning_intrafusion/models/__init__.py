"""Small reference architectures used by the examples, benchmarks and tests."""

from lightning_intrafusion.models.small import (
    MLP,
    MixedOpsNet,
    SmallMobileNet,
    SmallResNet,
    SmallTransformer,
    SmallVGG,
    resnet18,
)

__all__ = ["MLP", "MixedOpsNet", "SmallMobileNet", "SmallResNet", "SmallTransformer", "SmallVGG", "resnet18"]
