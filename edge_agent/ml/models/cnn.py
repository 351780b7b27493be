"""The FedAvg MNIST CNN (McMahan et al. 2017; also VBFL's and the PoS-BFL paper's): 1.66 M parameters.

conv5x5(32, pad 2) -> ReLU -> maxpool 2 -> conv5x5(64, pad 2) -> ReLU -> maxpool 2 ->
flatten (NCHW, 3136) -> fc 512 -> ReLU -> fc 10; 1,663,370 parameters.
"""

from __future__ import annotations

LAYOUT = (
    ("conv1.weight", (32, 1, 5, 5)),
    ("conv1.bias", (32,)),
    ("conv2.weight", (64, 32, 5, 5)),
    ("conv2.bias", (64,)),
    ("fc1.weight", (512, 64 * 7 * 7)),
    ("fc1.bias", (512,)),
    ("fc2.weight", (10, 512)),
    ("fc2.bias", (10,)),
)

# From 100 test images a validator evaluates a CNN in a session of its own with its weights
# as constant initializers, which ONNX Runtime pre-packs (NCHWc convolutions, packed GEMM).
# CPU ms, session creation included, with the agents' allocator setting: 50 images 19.7
# against 15.0 shared, 200 images 44.4 against 57.7, 500 images 95.9 against 144.9
# (python benchmarks/bench_eval_batch.py --sessions --arch mlp,cnn, 2026-12-05 10:44).
BAKE_FROM = 100


def module():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
            self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
            self.fc1 = nn.Linear(64 * 7 * 7, 512)
            self.fc2 = nn.Linear(512, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            x = torch.flatten(x, 1)
            x = F.relu(self.fc1(x))
            return self.fc2(x)

    return CNN()
