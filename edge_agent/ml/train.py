"""Local training with PyTorch (with the trainer's worker, edge_agent/ml/trainer_worker.py,
and the architectures' ``module()`` functions and exporter in edge_agent/ml/models/, the only
code of the testbed that imports torch).

The torch modules are the architectures of ``edge_agent.ml.models`` (one file each).
Workers train the current global model on their partition with plain mini-batch SGD
(no momentum, no weight decay) and cross-entropy, as FedAvg's ClientUpdate
(McMahan et al. 2017). Parameters cross this boundary as float32 numpy dicts whose
names and shapes are those of ``edge_agent.ml.arch.param_shapes``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .arch import check_params, param_shapes

__all__ = ["build_model", "torch_accuracy_bp", "torch_predict", "train_local"]


def build_model(arch: str) -> nn.Module:
    """A fresh torch module for ``arch``: ``module()`` of edge_agent/ml/models/ARCH.py (its
    state_dict matches arch.param_shapes)."""
    return models.get(arch).module()


def _load(arch: str, params: dict[str, np.ndarray]) -> nn.Module:
    check_params(arch, params)
    model = build_model(arch)
    state = {k: torch.from_numpy(np.array(params[k], dtype=np.float32, copy=True)) for k, _ in
             param_shapes(arch)}
    model.load_state_dict(state, strict=True)
    return model


def _export(model: nn.Module, arch: str) -> dict[str, np.ndarray]:
    state = model.state_dict()
    return {k: np.ascontiguousarray(state[k].detach().cpu().numpy(), dtype=np.float32).copy()
            for k, _ in param_shapes(arch)}


def train_local(
    arch: str,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    threads: int = 1,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """``epochs`` passes of plain SGD on (x, y) starting from ``params``; returns new params.

    Each epoch visits the samples in an order drawn from a ``torch.Generator`` seeded with
    ``seed``, so the same inputs and seed give bit-identical results on one machine (and
    device: ``cuda`` keeps the shard and the model on the GPU; the order is drawn on the CPU).
    """
    torch.set_num_threads(int(threads))
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need the same non-zero number of images and labels, got {len(x)}, {len(y)}")
    dev = torch.device(device)
    model = _load(arch, params).to(dev)
    model.train()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28).to(dev)
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=float(lr), momentum=0.0, weight_decay=0.0)
    gen = torch.Generator().manual_seed(int(seed))
    n = len(xt)
    for _ in range(int(epochs)):
        order = torch.randperm(n, generator=gen).to(dev)
        for i in range(0, n, int(batch_size)):
            idx = order[i : i + int(batch_size)]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return _export(model, arch)


def train_pfedme(
    arch: str,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    local_iters: int,
    batch_size: int,
    k: int,
    personal_lr: float,
    lr: float,
    lam: float,
    seed: int,
    threads: int = 1,
    device: str = "cpu",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """pFedMe's client update (Dinh, Tran, Nguyen, "Personalized Federated Learning with
    Moreau Envelopes", NeurIPS 2020, Algorithm 1).

    For each of ``local_iters`` mini-batches: K steps solve the personalized problem
    theta <- theta - personal_lr * (grad f(theta) + lam * (theta - w)), then the local model
    moves towards it, w <- w - lr * lam * (w - theta). Returns (w, theta): w is sent for
    aggregation, theta is the device's personalized model (whose accuracy pFedMe reports).
    """
    torch.set_num_threads(int(threads))
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need the same non-zero number of images and labels, got {len(x)}, {len(y)}")
    dev = torch.device(device)
    theta = _load(arch, params).to(dev)
    theta.train()
    w = {name: p.detach().clone() for name, p in theta.named_parameters()}
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28).to(dev)
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(dev)
    gen = torch.Generator().manual_seed(int(seed))
    n, b = len(xt), min(int(batch_size), len(xt))
    order, pos = torch.randperm(n, generator=gen).to(dev), 0
    for _ in range(int(local_iters)):
        if pos + b > n:
            order, pos = torch.randperm(n, generator=gen).to(dev), 0
        idx = order[pos : pos + b]
        pos += b
        for _ in range(int(k)):
            theta.zero_grad(set_to_none=True)
            F.cross_entropy(theta(xt[idx]), yt[idx]).backward()
            with torch.no_grad():
                for name, p in theta.named_parameters():
                    p -= personal_lr * (p.grad + lam * (p - w[name]))
        with torch.no_grad():
            for name, p in theta.named_parameters():
                w[name] -= lr * lam * (w[name] - p)
    personal = _export(theta, arch)
    with torch.no_grad():
        for name, p in theta.named_parameters():
            p.copy_(w[name])
    return _export(theta, arch), personal


@torch.no_grad()
def torch_predict(arch: str, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits float32 [n, 10] computed by the torch module (for cross-checks)."""
    model = _load(arch, params).eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
    return model(xt).numpy()


def torch_accuracy_bp(arch: str, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> int:
    """Accuracy in basis points (``correct * 10000 // n``) computed with torch."""
    y = np.asarray(y).reshape(-1)
    correct = int((torch_predict(arch, params, x).argmax(axis=1) == y).sum())
    return correct * 10000 // len(y)
