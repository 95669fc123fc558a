"""An nn.LSTM that can run unrolled in plain tensor ops, for the gradient penalty's double backward.

The fused LSTM kernels have no double backward (cuDNN raises, oneDNN falls back to a generic path), and torch's
native cell takes a fresh transpose of the recurrent weight at every time step. In a double backward each step's
weight-sized gradient then waits in a buffer of its own until the end of the backward pass: T of them alive at
once, which grows with the sequence length whatever the batch. Unrolled here, the input projection of all steps is
one matmul and every step shares one transposed recurrent weight, so those gradients add up in a single buffer and
the penalty's memory follows batch x steps x widths only.
"""
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class LeanLSTM(nn.LSTM):
    """nn.LSTM (same parameters, state dict and kernels) whose forward runs unrolled while `unrolled` is set.
    The unrolled form covers what the GAN uses: one layer, one direction, batch_first, zero initial state."""

    unrolled = False

    def forward(self, x, hx=None):
        if not self.unrolled:
            return super().forward(x, hx)
        if hx is not None or self.num_layers != 1 or self.bidirectional or not self.batch_first \
                or self.proj_size or not self.bias or x.dim() != 3:
            raise NotImplementedError("LeanLSTM unrolls only one batch_first layer with biases and zero state")
        return unrolled_lstm(x, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0)


class _Steps(torch.autograd.Function):
    """[B, T, H] -> T tensors [B, H] (unbind), with a backward that is _Stack, whose backward is _Steps again.
    torch's own stack/unbind differentiate through one select per step, and in a double backward each select's
    backward fills a zero [B, T, H] tensor: T^2 work and memory. These two stay one node each at any order."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        return x.unbind(1)

    @staticmethod
    def backward(ctx, *grads):
        b, _, h = ctx.shape
        zeros = None
        filled = []
        for g in grads:   # a step whose output was not used has no gradient
            if g is None:
                zeros = torch.zeros(b, h, dtype=ctx.dtype, device=ctx.device) if zeros is None else zeros
                g = zeros
            filled.append(g)
        return _Stack.apply(*filled)


class _Stack(torch.autograd.Function):
    """T tensors [B, H] -> [B, T, H]; see _Steps."""

    @staticmethod
    def forward(ctx, *steps):
        return torch.stack(steps, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return _Steps.apply(grad)


def unrolled_lstm(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                  b_hh: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """nn.LSTM's equations (gate order i, f, g, o) over x [B, T, I] -> (output [B, T, H], (h_n, c_n) [1, B, H])."""
    hidden = w_hh.shape[1]
    projected = torch.addmm(b_ih + b_hh, x.flatten(0, 1), w_ih.t()).view(x.shape[0], x.shape[1], 4 * hidden)
    recurrent = w_hh.t()   # one view for all steps: its gradient is accumulated in one buffer
    h = c = None
    outputs = []
    for step in _Steps.apply(projected):
        gates = step if h is None else torch.addmm(step, h, recurrent)
        # one sigmoid over all four gates (g's share is wasted) and few ops per step: at small widths the
        # penalty's cost is the count of autograd nodes, which the double backward multiplies
        sig = torch.sigmoid(gates)
        i, f, o = sig[:, :hidden], sig[:, hidden:2 * hidden], sig[:, 3 * hidden:]
        g = torch.tanh(gates[:, 2 * hidden:3 * hidden])
        c = i * g if c is None else torch.addcmul(f * c, i, g)
        h = o * torch.tanh(c)
        outputs.append(h)
    return _Stack.apply(*outputs), (h.unsqueeze(0), c.unsqueeze(0))


@contextmanager
def unrolled(module: nn.Module) -> Iterator[None]:
    """Every LeanLSTM inside module runs unrolled within the block (the flag is an instance attribute, so
    DataParallel's replicas, made at each call, carry it)."""
    lstms = [m for m in module.modules() if isinstance(m, LeanLSTM)]
    for m in lstms:
        m.unrolled = True
    try:
        yield
    finally:
        for m in lstms:
            m.unrolled = False
