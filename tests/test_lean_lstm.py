"""lean_lstm.LeanLSTM: the unrolled form equals nn.LSTM (forward, gradients, the penalty's double backward) and
keeps one transposed recurrent weight per layer, whatever the sequence length."""
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from gan_trainer_base import gradient_penalty
from lean_lstm import LeanLSTM, unrolled
from train_lstm_gan import Discriminator


def twin_lstms(n_in=3, hidden=5, device="cpu"):
    torch.manual_seed(0)
    reference = nn.LSTM(n_in, hidden, batch_first=True).double().to(device)
    lean = LeanLSTM(n_in, hidden, batch_first=True).double().to(device)
    lean.load_state_dict(reference.state_dict())
    return reference, lean


def test_same_parameters_and_state_dict_as_nn_lstm():
    reference, lean = twin_lstms()
    assert list(reference.state_dict()) == list(lean.state_dict())
    assert isinstance(lean, nn.LSTM)


def test_unrolled_forward_and_gradients_equal_nn_lstm(device):
    reference, lean = twin_lstms(device=device)   # on CUDA the reference is cuDNN's LSTM (float64)
    x = torch.randn(4, 7, 3, dtype=torch.double, device=device, requires_grad=True)
    out_ref, (h_ref, c_ref) = reference(x)
    with unrolled(lean):
        out, (h, c) = lean(x)
    assert not lean.unrolled   # the flag is cleared after the block
    for a, b in ((out, out_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    weights = torch.randn_like(out)
    grads_ref = torch.autograd.grad((out_ref * weights).sum(), [x, *reference.parameters()])
    grads = torch.autograd.grad((out * weights).sum(), [x, *lean.parameters()])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@contextmanager
def native_cells(model):
    """nn.LSTM without oneDNN (CPU) or cuDNN (CUDA) runs torch's native cells, which have a double backward."""
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(enabled=False):
        yield


@pytest.mark.parametrize("norm,critic_norm", [("paper", "instance"), ("sample", "instance"), ("sample", "layer")])
def test_penalty_double_backward_equals_native_cells(norm, critic_norm, device):
    torch.manual_seed(1)
    critic = Discriminator(3, scale=0.03125, norm=critic_norm).double().to(device)
    real, fake, eta = (torch.rand(*shape, dtype=torch.double).to(device) for shape in ((3, 9, 3), (3, 9, 3), (3, 1, 1)))

    def penalty_grads(context):
        critic.zero_grad(set_to_none=True)
        with context(critic):
            gp = gradient_penalty(critic, real, fake, 10.0, norm, eta)
        gp.backward()
        return gp.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                             for p in critic.parameters()]
    gp_ref, grads_ref = penalty_grads(native_cells)
    gp, grads = penalty_grads(unrolled)
    torch.testing.assert_close(gp, gp_ref, rtol=1e-6, atol=1e-9)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def transposes_feeding(graph_root, params):
    """Count the autograd nodes that transpose one of params (what holds a weight-sized gradient each)."""
    ids = {id(p) for p in params}
    seen, stack, count = set(), [graph_root], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and type(child).__name__ == "AccumulateGrad" and id(child.variable) in ids \
                    and type(node).__name__.startswith("TBackward"):
                count += 1
            stack.append(child)
    return count


@pytest.mark.parametrize("steps", [20, 40])
def test_one_recurrent_transpose_per_layer_whatever_the_length(steps):
    """The memory regression: torch's native cell takes a fresh w_hh.t() per step, and in the penalty's backward
    each of those nodes holds a weight-sized gradient until the end (12 GiB at the paper's widths, 600 steps)."""
    torch.manual_seed(2)
    critic = Discriminator(3, scale=0.0625)
    real, fake = torch.rand(2, steps, 3), torch.rand(2, steps, 3)
    w_hh = [m.weight_hh_l0 for m in critic.modules() if isinstance(m, nn.LSTM)]
    with unrolled(critic):
        lean = transposes_feeding(gradient_penalty(critic, real, fake, 10.0).grad_fn, w_hh)
    with native_cells(critic):
        native = transposes_feeding(gradient_penalty(critic, real, fake, 10.0).grad_fn, w_hh)
    assert lean == len(w_hh)
    assert native >= len(w_hh) * (steps - 1)   # what the lean path avoids


def test_unrolled_refuses_what_it_does_not_implement():
    lstm = LeanLSTM(3, 4, num_layers=2, batch_first=True)
    with unrolled(lstm), pytest.raises(NotImplementedError):
        lstm(torch.randn(2, 5, 3))
    assert lstm(torch.randn(2, 5, 3))[0].shape == (2, 5, 4)   # outside the block: nn.LSTM's own forward
