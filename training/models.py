"""The two architectures. Each exposes its stages by name so the exported inspection graph can show them.

``forward_stages(x)`` returns ``[(name, kind, tensor), ...]`` in order, ending with the logits; ``forward`` is its
last entry, so what is trained and what is inspected are the same code.
"""

from __future__ import annotations

import torch
from torch import nn

Stage = tuple[str, str, torch.Tensor]


class Stages(list):
    """The ordered (name, kind, tensor) record of one forward pass."""

    def add(self, name: str, kind: str, value: torch.Tensor) -> torch.Tensor:
        self.append((name, kind, value))
        return value


class LeNet(nn.Module):
    """The classic layout: conv 6@5x5 → ReLU → pool → conv 16@5x5 → ReLU → pool → FC 120 → FC 100 → FC classes."""

    cam_stage = None  # flatten + FC head: no class activation map

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, kernel_size=5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 100)
        self.head = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward_stages(self, x: torch.Tensor) -> list[Stage]:
        stages = Stages()
        add = stages.add
        x = add("conv1", "conv", self.conv1(x))
        x = add("relu1", "relu", self.relu(x))
        x = add("pool1", "pool", self.pool(x))
        x = add("conv2", "conv", self.conv2(x))
        x = add("relu2", "relu", self.relu(x))
        x = add("pool2", "pool", self.pool(x))
        x = add("fc1", "fc", self.fc1(torch.flatten(x, 1)))
        x = add("relu3", "relu", self.relu(x))
        x = add("fc2", "fc", self.fc2(x))
        x = add("relu4", "relu", self.relu(x))
        add("fc3", "fc", self.head(x))
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1][2]


class ConvBN(nn.Module):
    """3x3 convolution (no bias) followed by batch norm; exported as one fused convolution."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels_out, momentum=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))

    def fused_weight(self) -> torch.Tensor:
        """The convolution's weights with the batch norm's scale folded in, as the exported graph has them."""
        scale = self.norm.weight / torch.sqrt(self.norm.running_var + self.norm.eps)
        return self.conv.weight * scale[:, None, None, None]


class ConvNet(nn.Module):
    """The accurate default: a stem and three blocks of (conv → pool → ReLU → conv → ReLU), global average pooling
    and one linear layer. Each conv includes its batch norm (folded into it in the exported graph). The linear head
    on pooled maps is what makes class activation maps possible.

    Widths are (w/2, w, 2w, 4w); each block halves the resolution: 32 → 16 → 8 → 4. A block listed in ``residual``
    is followed by two more convs whose output is added to their input (a ResNet shortcut: depth without the
    vanishing signal).
    """

    cam_stage = "features"

    def __init__(self, num_classes: int = 4, width: int = 64, residual: tuple[int, ...] = ()):
        super().__init__()
        widths = [width // 2, width, 2 * width, 4 * width]
        self.stem = ConvBN(3, widths[0])
        self.blocks = nn.ModuleList(
            nn.ModuleList([ConvBN(widths[i], widths[i + 1]), ConvBN(widths[i + 1], widths[i + 1])])
            for i in range(3)
        )
        self.residual = nn.ModuleDict({
            str(number): nn.ModuleList([ConvBN(widths[number], widths[number]), ConvBN(widths[number], widths[number])])
            for number in residual
        })
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.head = nn.Linear(widths[-1], num_classes, bias=True)

    def forward_stages(self, x: torch.Tensor) -> list[Stage]:
        stages = Stages()
        add = stages.add
        x = add("stem_conv", "conv", self.stem(x))
        x = add("stem_relu", "relu", self.relu(x))
        for number, (first, second) in enumerate(self.blocks, start=1):
            x = add(f"block{number}_conv1", "conv", first(x))
            x = add(f"block{number}_pool", "pool", self.pool(x))
            x = add(f"block{number}_relu1", "relu", self.relu(x))
            x = add(f"block{number}_conv2", "conv", second(x))
            last = number == len(self.blocks)
            key = str(number)
            shortcut = self.residual[key] if key in self.residual else None
            x = add(self.cam_stage if last and shortcut is None else f"block{number}_relu2", "relu", self.relu(x))
            if shortcut is not None:
                branch = add(f"block{number}_res_conv1", "conv", shortcut[0](x))
                branch = add(f"block{number}_res_relu1", "relu", self.relu(branch))
                branch = add(f"block{number}_res_conv2", "conv", shortcut[1](branch))
                branch = add(f"block{number}_res_relu2", "relu", self.relu(branch))
                x = add(self.cam_stage if last else f"block{number}_res_add", "add", x + branch)
        x = add("global_pool", "pool", x.mean(dim=(2, 3)))
        add("fc", "fc", self.head(x))
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1][2]


def build(arch: str, num_classes: int, width: int = 64, residual: tuple[int, ...] = ()) -> nn.Module:
    if arch == "lenet":
        return LeNet(num_classes)
    if arch == "convnet":
        return ConvNet(num_classes, width, residual)
    raise ValueError(f"Unknown architecture {arch!r}; choose 'convnet' or 'lenet'.")


def first_conv_weight(model: nn.Module) -> torch.Tensor:
    """The first convolution's weights (out, in, kh, kw) as the exported graph computes with them."""
    first = next(m for m in model.modules() if isinstance(m, (ConvBN, nn.Conv2d)))
    return first.fused_weight() if isinstance(first, ConvBN) else first.weight


def keep_first_classes(model: nn.Module, count: int) -> nn.Module:
    """Drop auxiliary outputs: keep the head's first ``count`` rows (the product labels), in place.

    Softmax over the kept logits is exactly the trained model's prediction given that the image is one of them.
    """
    head: nn.Linear = model.head
    if head.out_features == count:
        return model
    kept = nn.Linear(head.in_features, count, bias=head.bias is not None).to(head.weight.device)
    with torch.no_grad():
        kept.weight.copy_(head.weight[:count])
        if head.bias is not None:
            kept.bias.copy_(head.bias[:count])
    model.head = kept
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
