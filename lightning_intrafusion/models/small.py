"""Compact networks for 8x8 images (scikit-learn's digits) covering the layer patterns the pruner
supports: conv+BN stacks with flatten->linear, residual adds, concat, depthwise convs, GroupNorm,
inverted residuals with squeeze-and-excitation gates, MLPs and transformer blocks with separate
q/k/v projections."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SmallVGG(nn.Module):
    """VGG-style conv+BN stack; the classifier sees a 2x2 spatial map (flatten -> linear)."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(1, w), _conv_bn(w, w), nn.MaxPool2d(2),
            _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 4, 4 * w), nn.ReLU(), nn.Linear(4 * w, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet with basic blocks (residual adds, projection shortcuts)."""

    def __init__(self, width: int = 16, blocks: tuple = (2, 2, 2), num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(c, c_out, 2 if (j == 0 and i > 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> SmallResNet:
    """ResNet-18 layout (64-128-256-512 channels, 2 blocks per stage, 3x3 stem): 11.2M parameters."""
    return SmallResNet(width=64, blocks=(2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


class MixedOpsNet(nn.Module):
    """Concat of two branches, a depthwise conv, GroupNorm, LayerNorm and flatten->linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.branch_a = nn.Conv2d(16, 8, 1)
        self.branch_b = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(16 * 4, 32)
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.gn(self.stem(x)))
        x = F.relu(self.dw(x))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = F.adaptive_avg_pool2d(F.relu(x), 2).flatten(1)
        return self.head(self.ln(F.relu(self.fc(x))))


class SqueezeExcite(nn.Module):
    """Channel gate ``x * sigmoid(fc2(relu(fc1(mean(x)))))`` (SENet, MobileNetV3, EfficientNet)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(gate)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, depthwise 3x3, optional SE gate, linear 1x1 projection,
    residual add when shapes allow."""

    def __init__(self, c_in: int, c_out: int, expand: int = 4, stride: int = 1, se: bool = False) -> None:
        super().__init__()
        hidden = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        layers = [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                  nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        if se:
            layers.append(SqueezeExcite(hidden))
        layers += [nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class SmallMobileNet(nn.Module):
    """MobileNetV2-style network (``se=True``: with squeeze-and-excitation gates, as in MobileNetV3)."""

    def __init__(self, width: int = 8, se: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(w, w, se=se), InvertedResidual(w, 2 * w, stride=2, se=se), InvertedResidual(2 * w, 2 * w, se=se),
        )
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: tuple = (128, 64), num_classes: int = 10) -> None:
        super().__init__()
        dims = (d_in,) + tuple(hidden)
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.flatten(1)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (as in BERT). The number of heads
    is derived from the projection width, so removing whole heads needs no attribute update."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = self.q.out_features // self.head_dim

        def split(y: Tensor) -> Tensor:
            return y.reshape(b, t, h, self.head_dim).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(a.transpose(1, 2).reshape(b, t, h * self.head_dim))


class TransformerBlock(nn.Module):
    """Pre-norm block; ``attention="qkv"`` uses separate q/k/v linears, ``"torch"`` nn.MultiheadAttention."""

    def __init__(self, dim: int, heads: int, mlp: int, attention: str = "qkv") -> None:
        super().__init__()
        if attention not in ("qkv", "torch"):
            raise ValueError(f"attention must be 'qkv' or 'torch', got {attention!r}")
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads) if attention == "qkv" else nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        if isinstance(self.attn, nn.MultiheadAttention):
            x = x + self.attn(h, h, h, need_weights=False)[0]
        else:
            x = x + self.attn(h)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class SmallTransformer(nn.Module):
    """A pre-norm vision transformer for 8x8 images: each image row is a token."""

    def __init__(self, dim: int = 64, heads: int = 4, mlp: int = 128, depth: int = 2, num_classes: int = 10,
                 attention: str = "qkv") -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp, attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(1))
