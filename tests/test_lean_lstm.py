"""lean_lstm.LeanLSTM: the unrolled form equals nn.LSTM (forward, gradients, the penalty's double backward) and
keeps the penalty's backward memory independent of the sequence length."""
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from lean_lstm import LeanLSTM, unrolled
from models import Discriminator
from wgan_gp import gradient_penalty

ROOT = Path(__file__).resolve().parents[1]


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


def test_double_backward_through_every_output_equals_native_cells(device):
    """The penalty's pattern on one layer, with h_n and c_n used too (their gradients enter the recurrence):
    a create_graph gradient to the input, then the gradient of a function of it to everything."""
    reference, lean = twin_lstms(device=device)
    x = torch.randn(3, 6, 3, dtype=torch.double, device=device, requires_grad=True)
    v_out, v_h, v_c = (torch.randn(*shape, dtype=torch.double, device=device) for shape in ((3, 6, 5), (1, 3, 5),
                                                                                             (1, 3, 5)))

    def second_order(lstm, context):
        with context(lstm):
            out, (h, c) = lstm(x)
            score = (out * v_out).sum() + (h * v_h).sum() + (c.tanh() * v_c).sum()
            grad_x, = torch.autograd.grad(score, x, create_graph=True)
        return torch.autograd.grad((grad_x ** 2).sum() + score, [x, *lstm.parameters()])
    for a, b in zip(second_order(lean, unrolled), second_order(reference, native_cells)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_refuses_what_would_not_differentiate():
    """w_hh's gradient comes from values kept aside, and the recorded backward's nodes have plain backwards:
    asking for more than the penalty does must fail loudly, not return gradients that silently do not
    differentiate."""
    _, lean = twin_lstms()
    x = torch.randn(2, 4, 3, dtype=torch.double)
    with unrolled(lean):
        out, _ = lean(x)
    with pytest.raises(RuntimeError, match="differentiated again"):
        torch.autograd.grad(out.sum(), lean.weight_hh_l0, create_graph=True)
    x.requires_grad_(True)   # the penalty's way is fine; a third order is not
    with unrolled(lean):
        grad_x, = torch.autograd.grad(lean(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable twice"):
        torch.autograd.grad((grad_x ** 2).sum(), lean.weight_ih_l0, create_graph=True)


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


PENALTY_BACKWARD_PEAK = """
import sys, torch
from lean_lstm import unrolled
from models import Discriminator
from wgan_gp import gradient_penalty

steps, path = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
torch.manual_seed(0)
critic = Discriminator(3, scale=0.25)
real, fake = torch.rand(1, steps, 3), torch.rand(1, steps, 3)
with unrolled(critic) if path == "lean" else torch.backends.mkldnn.flags(enabled=False):
    gp = gradient_penalty(critic, real, fake, 10.0)

def kb(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")   # the peak (VmHWM) from here: the backward's own
before = kb("VmRSS")
gp.backward()
print(kb("VmHWM") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_penalty_backward_memory_does_not_grow_with_the_sequence_length():
    """The memory regression: torch's native cell takes a fresh w_hh.t() per step, and in the penalty's backward
    each step's weight-sized gradient waits in its own buffer until the end (12 GiB at the paper's widths and 600
    steps); the lean path sums the recurrent weight's gradient over all steps in one product."""
    def peak_kb(steps, path):
        r = subprocess.run([sys.executable, "-c", PENALTY_BACKWARD_PEAK, str(steps), path], cwd=ROOT,
                           capture_output=True, text=True, check=True)
        return int(r.stdout.split()[-1])
    native = peak_kb(100, "native") - peak_kb(50, "native")
    lean = peak_kb(100, "lean") - peak_kb(50, "lean")
    assert native > 50_000, native   # ~69 MB per 50 steps at scale 0.25, batch 1
    assert lean < 30_000, lean       # activations (~7 MB) and glibc's heap: -2 to 17 MB measured


def test_unrolled_refuses_what_it_does_not_implement():
    lstm = LeanLSTM(3, 4, num_layers=2, batch_first=True)
    with unrolled(lstm), pytest.raises(NotImplementedError):
        lstm(torch.randn(2, 5, 3))
    assert lstm(torch.randn(2, 5, 3))[0].shape == (2, 5, 4)   # outside the block: nn.LSTM's own forward
