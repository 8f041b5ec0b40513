"""The benchmark's encoder: (B, 3, 96, 96) -> (B, 64), strided convolutions and GroupNorm."""

from torch import nn


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers, width = [], 3
        for out in (16, 32, 64):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(4, out), nn.ReLU()]
            width = out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 64

    def forward(self, x):
        return self.net(x)
