"""Small reference architectures used by the examples, benchmarks and tests."""

from lightning_intrafusion.models.small import SmallResNet, SmallTransformer, SmallVGG, MixedOpsNet, MLP, resnet18

__all__ = ["MLP", "MixedOpsNet", "SmallResNet", "SmallTransformer", "SmallVGG", "resnet18"]
