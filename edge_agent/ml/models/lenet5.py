"""LeNet-5 (LeCun, Bottou, Bengio, Haffner 1998), adapted to 28x28 inputs: 61,706 parameters.

conv5x5(6, pad 2) -> ReLU -> maxpool 2 -> conv5x5(16) -> ReLU -> maxpool 2 ->
flatten (NCHW, 16*5*5 = 400) -> fc 120 -> ReLU -> fc 84 -> ReLU -> fc 10.

Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning applied to document
recognition", Proc. IEEE 86(11), 1998. What differs from the paper's network: the padding of
2 on the first convolution stands for the paper's 32x32 input (MNIST digits padded from
28x28); ReLU instead of the scaled tanh; max pooling instead of the trainable subsampling
layers (S2, S4: average times a learned coefficient plus a bias); C3 connects every input
map to every output map (the paper's sparse connection table is not kept); and the output
is a plain fc 10 with cross-entropy instead of the Euclidean RBF units.
"""

from __future__ import annotations

LAYOUT = (
    ("conv1.weight", (6, 1, 5, 5)),
    ("conv1.bias", (6,)),
    ("conv2.weight", (16, 6, 5, 5)),
    ("conv2.bias", (16,)),
    ("fc1.weight", (120, 16 * 5 * 5)),
    ("fc1.bias", (120,)),
    ("fc2.weight", (84, 120)),
    ("fc2.bias", (84,)),
    ("fc3.weight", (10, 84)),
    ("fc3.bias", (10,)),
)

# A session of its own per model from 300 test images (CPU ms, session creation included:
# 200 images 5.8 baked against 5.4 shared, 500 images 10.4 against 13.7, 1000 images 18.4
# against 26.1; python benchmarks/bench_eval_batch.py --sessions --arch lenet5
# --images 50,200,500,1000, 2026-12-05 13:27).
BAKE_FROM = 300


def module():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class LeNet5(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
            self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            x = torch.flatten(x, 1)
            x = F.relu(self.fc1(x))
            x = F.relu(self.fc2(x))
            return self.fc3(x)

    return LeNet5()
