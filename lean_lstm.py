"""An nn.LSTM with a lean unrolled form for the gradient penalty's double backward.

The fused LSTM kernels have no double backward (cuDNN raises, oneDNN falls back to a generic path), and torch's
native cell takes a fresh transpose of the recurrent weight at every time step: in a double backward each step's
weight-sized gradient then waits in a buffer of its own until the end, T of them alive at once.

The unrolled form here is one autograd Function for the recurrence, with its backward through time written in
plain tensor ops, so that the penalty's double backward can differentiate it. Its weight gradients are never
formed step by step: a rank-B product per step on a weight-sized buffer is memory-bound and was half of the
penalty's time at the paper's widths. Both places where the recurrent weight enters (the forward's h_{t-1} w_hh^T
and the backward's da_t w_hh) take it as a constant, and two small nodes add its gradient over all steps in one
product each, from the steps' values kept aside. Everything that does not need the recurrence (the input
projection, the gate derivatives) runs over all steps at once.
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


def unrolled_lstm(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                  b_hh: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """nn.LSTM's equations (gate order i, f, g, o) over x [B, T, I] -> (output [B, T, H], (h_n, c_n) [1, B, H]).
    Differentiable twice the way the gradient penalty does it (forward, gradients and double backward equal
    nn.LSTM's, tests/test_lean_lstm.py): a create_graph backward to the inputs, then a backward to everything.
    Beyond that it raises rather than return gradients that do not differentiate: w_hh's gradient in a create_graph
    backward (it is formed from values kept aside), and a third order."""
    steps, batch = x.shape[1], x.shape[0]
    # time-major inside: each step's slice is contiguous
    projected = torch.addmm(b_ih + b_hh, x.transpose(0, 1).flatten(0, 1), w_ih.t()).view(steps, batch, -1)
    kept = _Kept()
    token = _RecurrentWeight.apply(w_hh, kept)
    h, c, _ = _Recurrence.apply(projected, token, w_hh, kept)
    return h.transpose(0, 1), (h[-1:], c[-1:])


class _Kept:
    """Step values that a weight-gradient node needs and that exist only after the node was made."""
    da: torch.Tensor | None = None       # [T, B, 4H]: the gate pre-activations' gradients of the last backward
    h: torch.Tensor | None = None        # [T, B, H]: the recurrence's outputs


class _RecurrentWeight(torch.autograd.Function):
    """w_hh -> an empty token, the recurrence's input in its place. Its backward runs after the recurrence's
    (only when w_hh's gradient is wanted: the penalty's first backward asks for the input's alone) and forms
    the forward's share of w_hh's gradient, sum_t da_t^T h_{t-1}, in one product."""

    @staticmethod
    def forward(ctx, w_hh, kept):
        ctx.kept = kept
        return w_hh.new_zeros(0)

    @staticmethod
    def backward(ctx, _):
        _not_differentiable_again()
        da, h = ctx.kept.da, ctx.kept.h   # step t's gate gradients meet h_{t-1} (zero before the first step)
        return da[1:].flatten(0, 1).t() @ h[:-1].flatten(0, 1), None


class _RecurrentWeightInBackward(torch.autograd.Function):
    """Identity on the output gradient g [T, B, H] of a recorded backward, which uses w_hh as a constant in
    dh_{t-1} = g_{t-1} + da_t w_hh: its backward adds that use's share of w_hh's gradient in one product."""

    @staticmethod
    def forward(ctx, g, w_hh, kept):
        ctx.kept = kept
        return g.view_as(g)

    @staticmethod
    def backward(ctx, grad):
        _not_differentiable_again()
        da = ctx.kept.da
        return grad, da[1:].flatten(0, 1).t() @ grad[:-1].flatten(0, 1), None


def _not_differentiable_again() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError("unrolled LeanLSTM: differentiable twice, the gradient penalty's way, and w_hh's "
                           "gradient cannot be differentiated again: in a create_graph backward ask for the inputs' "
                           "gradients only")


class _Recurrence(torch.autograd.Function):
    """projected [T, B, 4H] (input projections and biases), token, w_hh [4H, H] -> h, c, a [T, B, *] (a: the
    gate pre-activations, returned so that a recorded backward can build on them)."""

    @staticmethod
    def forward(ctx, projected, token, w_hh, kept):
        hidden = w_hh.shape[1]
        a = projected.clone()
        h_all = projected.new_empty(*projected.shape[:2], hidden)
        c_all = torch.empty_like(h_all)
        w_t = w_hh.t().to(a.dtype)
        h = c = None
        for t in range(len(a)):
            if h is not None:
                a[t].addmm_(h, w_t)
            sig = a[t].sigmoid()   # over all four gates: g's share is unused, one op is cheaper than three
            i, f, o = sig[:, :hidden], sig[:, hidden:2 * hidden], sig[:, 3 * hidden:]
            g = a[t, :, 2 * hidden:3 * hidden].tanh()
            c = torch.mul(i, g, out=c_all[t]) if c is None else torch.addcmul(f * c, i, g, out=c_all[t])
            h = torch.mul(o, c.tanh(), out=h_all[t])
        ctx.save_for_backward(h_all, c_all, a, w_hh)
        ctx.kept = kept
        kept.h = h_all.detach()   # for _RecurrentWeight; detached before it becomes an output: no reference cycle
        ctx.set_materialize_grads(False)   # c and a are seldom used: no zero tensors for them
        return h_all, c_all, a

    @staticmethod
    def backward(ctx, g_h, g_c, g_a):
        h_all, c_all, a, w_hh = ctx.saved_tensors
        da = through_time(h_all, c_all, a, w_hh, g_h, g_c, g_a)
        ctx.kept.da = da.detach()
        return da, torch.zeros(0, dtype=da.dtype, device=da.device), None, None


def through_time(h_all: torch.Tensor, c_all: torch.Tensor, a: torch.Tensor, w_hh: torch.Tensor,
                 g_h: torch.Tensor | None, g_c: torch.Tensor | None, g_a: torch.Tensor | None) -> torch.Tensor:
    """Backpropagation through time -> da [T, B, 4H], the gate pre-activations' gradients. Recorded when grad
    mode is on (a create_graph backward), so that it can be differentiated once more."""
    hidden, steps = w_hh.shape[1], len(a)
    recorded = torch.is_grad_enabled()
    i_f, o = a[..., :2 * hidden].sigmoid(), a[..., 3 * hidden:].sigmoid()
    i, f = i_f[..., :hidden], i_f[..., hidden:]
    g = a[..., 2 * hidden:3 * hidden].tanh()
    tanh_c = c_all.tanh()
    # aten's derivative ops (x * s * (1 - s) and x * (1 - t^2)) are one node each, with their own double backward,
    # and keep no intermediates
    sigmoid_d, tanh_d = torch.ops.aten.sigmoid_backward, torch.ops.aten.tanh_backward
    dh_to_dc = tanh_d(o, tanh_c)
    # (dc, dc, dc, dh) times this -> the gradients of the i, f, g, o pre-activations
    # the forget gate meets c_{t-1}: nothing before the first step
    f_part = torch.cat([torch.zeros_like(f[:1]), sigmoid_d(c_all[:-1], f[1:])])
    to_da = torch.cat([sigmoid_d(g, i), f_part, tanh_d(i, g), sigmoid_d(tanh_c, o)], dim=2)
    g_h = torch.zeros_like(h_all) if g_h is None else g_h
    kept = _Kept()
    if recorded and w_hh.requires_grad:
        g_h = _RecurrentWeightInBackward.apply(g_h, w_hh, kept)
    w = w_hh.detach().to(a.dtype)
    # torch's own unbind differentiates through one select per step, each filling a zero [T, B, *] tensor in
    # a double backward: T^2. _Steps and _Stack stay one node each at any order.
    split = _Steps.apply if recorded else (lambda x: x.unbind(0))
    g_hs, dh_to_dcs, to_das, fs = split(g_h), split(dh_to_dc), split(to_da), split(f)
    g_cs = None if g_c is None else split(g_c)
    g_as = None if g_a is None else split(g_a)
    das = [None] * steps
    recurrent = dc = None
    for t in range(steps - 1, -1, -1):
        dh = g_hs[t] if recurrent is None else g_hs[t] + recurrent
        dc = dh * dh_to_dcs[t] if dc is None else torch.addcmul(dh * dh_to_dcs[t], dc, fs[t + 1])
        if g_cs is not None:
            dc = dc + g_cs[t]
        da = _GateGradients.apply(dc, dh, to_das[t])
        das[t] = da if g_as is None else da + g_as[t]
        if t:
            recurrent = das[t] @ w
    da = _Stack.apply(*das) if recorded else torch.stack(das)
    kept.da = da.detach()
    return da


class _GateGradients(torch.autograd.Function):
    """(dc, dh [B, H], k [B, 4H]) -> (dc, dc, dc, dh) * k, the four gates' gradients, as one node that keeps no
    [B, 4H] copy for its backward (cat and mul would: 1.2 GB of a 64 x 600 penalty at the paper's widths)."""

    @staticmethod
    def forward(ctx, dc, dh, k):
        ctx.save_for_backward(dc, dh, k)
        return torch.cat([dc, dc, dc, dh], dim=1) * k

    @staticmethod
    def backward(ctx, grad):
        _not_differentiable_again()
        dc, dh, k = ctx.saved_tensors
        hidden = dc.shape[1]
        to_gates = grad * k
        grad_dc = to_gates[:, :3 * hidden].unflatten(1, (3, hidden)).sum(1)
        return grad_dc, to_gates[:, 3 * hidden:], torch.cat([dc, dc, dc, dh], dim=1) * grad


class _Steps(torch.autograd.Function):
    """[T, B, H] -> T tensors [B, H] (unbind), with a backward that is _Stack, whose backward is _Steps again."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        return x.unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        zeros = None
        filled = []
        for g in grads:   # a step whose output was not used has no gradient
            if g is None:
                zeros = torch.zeros(ctx.shape[1:], dtype=ctx.dtype, device=ctx.device) if zeros is None else zeros
                g = zeros
            filled.append(g)
        return _Stack.apply(*filled)


class _Stack(torch.autograd.Function):
    """T tensors [B, H] -> [T, B, H]; see _Steps."""

    @staticmethod
    def forward(ctx, *steps):
        return torch.stack(steps)

    @staticmethod
    def backward(ctx, grad):
        return _Steps.apply(grad)


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
