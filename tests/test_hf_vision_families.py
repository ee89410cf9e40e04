"""Hugging Face vision families built from small configs (nothing downloaded), checked for what a pruned model
computes: every unit that can be pruned, except widths under a norm across channels, is first silenced on
alternate units (conv/linear rows, BatchNorm parameters and statistics, consumer columns), so plain pruning
must remove exactly the silent ones and leave the logits unchanged."""

import copy
import warnings

import pytest
import torch

from helpers import silence_odd_units

transformers = pytest.importorskip("transformers")

from lightning_intrafusion import prune  # noqa: E402

T = transformers
FAMILIES = {
    # conv + BatchNorm
    "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])),
    "regnet": lambda: T.RegNetForImageClassification(T.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                                     groups_width=8)),  # grouped convs, squeeze-excitation
    "mobilenet_v2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(depth_multiplier=0.35, image_size=32)),
    "efficientnet": lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(
        width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320, image_size=32)),
    # LayerNorm'd conv nets and a conv/attention hybrid
    "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1])),
    "poolformer": lambda: T.PoolFormerForImageClassification(T.PoolFormerConfig(hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1])),
    "mobilevit": lambda: T.MobileViTForImageClassification(T.MobileViTConfig(
        image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48])),
    # vision transformers
    "beit": lambda: T.BeitForImageClassification(T.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                               intermediate_size=64, image_size=32, patch_size=8)),
}
MINIMUM_GROUPS = {"resnet": 2, "regnet": 4, "mobilenet_v2": 10, "efficientnet": 10, "convnext": 2, "poolformer": 4,
                  "mobilevit": 10, "beit": 4}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_removing_silenced_units_leaves_the_logits_unchanged(family):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FAMILIES[family]().eval()
    images = {"pixel_values": torch.randn(2, 3, 32, 32)}
    silenced = silence_odd_units(model, images)
    with torch.no_grad():
        expected = model(**images).logits
    pruned = copy.deepcopy(model)
    report = prune(pruned, images, 0.5, method="default", importance="l2", include=silenced)
    assert len(report.groups) == len(silenced) >= MINIMUM_GROUPS[family] and report.params_after < report.params_before
    with torch.no_grad():
        assert torch.allclose(pruned(**images).logits, expected, atol=1e-5)
