"""Hugging Face ViT and DINOv2 (built from small configs, nothing downloaded): patch embedding (conv ->
flatten -> transpose), class token and position embeddings on the residual stream, heads, MLP; DINOv2 adds
layer scale and a classifier on the class token and the mean of the patch tokens."""

import copy

import pytest
import torch

from helpers import EvenUnitsFirst, duplicate_odd_units
from lightning_intrafusion import OTConfig, prune

transformers = pytest.importorskip("transformers")


SMALL = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_labels=10, attn_implementation="sdpa")
MODELS = {
    "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, intermediate_size=128)),
    # layer scale on both branches; the classifier reads the class token and the mean of the patch tokens
    "dinov2": lambda: transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**SMALL, mlp_ratio=2)),
}


@pytest.mark.parametrize("family", list(MODELS))
def test_whole_vit_fuses_duplicated_channels_exactly(family):
    torch.manual_seed(0)
    model = MODELS[family]().eval()
    images = torch.randn(2, 3, 16, 16)
    # every group duplicated and ranked in units of 16 channels (one head)
    duplicate_odd_units(model, images, units={"*": 16})
    expected = model(images).logits
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    report = prune(fused, images, 0.5, importance=EvenUnitsFirst(16), ot_config=OTConfig(features="producer"))
    prune(plain, images, 0.5, importance=EvenUnitsFirst(16), method="default")
    assert report.params_after < 0.5 * report.params_before
    assert len(report.groups) == 5  # residual stream, heads and MLP of both layers
    assert torch.allclose(fused(images).logits, expected, atol=1e-5)
    assert (plain(images).logits - expected).abs().max() > 1e-2
