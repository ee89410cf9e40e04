"""Optimizer state follows the parameters through a pruning step: for plain pruning the kept
weights are a selection of the old ones, so state that equalled the weights must still equal them."""

import pytest
import torch

from lightning_intrafusion import prune
from lightning_intrafusion.models import SmallResNet, SmallTransformer
from lightning_intrafusion.optimizers import restore_optimizer_state, snapshot_optimizer_state
from test_prune_exactness import GroupedConvNet

X = torch.randn(4, 1, 8, 8)

MODELS = {
    "resnet": (lambda: SmallResNet(width=8, blocks=(1, 1)), {}),
    "grouped_conv": (GroupedConvNet, {}),
    "transformer_everything": (lambda: SmallTransformer(dim=32, heads=4, mlp=64), {"channel_blocks": {"*.attn.q": 8}}),
    "multihead_attention": (lambda: SmallTransformer(dim=32, heads=4, mlp=64, attention="torch"), {}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_state_is_sliced_exactly_like_the_weights(name):
    factory, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        optimizer.state[p]["momentum_buffer"] = p.detach().clone()  # state that mirrors the weights
    saved = snapshot_optimizer_state([optimizer], model)

    report = prune(model, X, 0.5, method="default", **kwargs)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert restore_optimizer_state([optimizer], model, saved, report.removals) == len(list(model.parameters()))
    shrunk = 0
    for pname, p in model.named_parameters():
        buffer = optimizer.state[p]["momentum_buffer"]
        assert torch.equal(buffer, p.detach()), pname
        shrunk += tuple(p.shape) != saved[pname]["shape"]
    assert shrunk > 0
