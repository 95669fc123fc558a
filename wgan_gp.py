"""The WGAN-GP step of the paper (Gulrajani et al.'s gradient penalty, as the original code trains it): the critic
step with the gradient penalty, the generator step, the batch sampler over the real windows and the optimizers'
state. Built from tensors and WGANGPSettings (whose from_args reads the flags); it writes no file (its epoch's
losses are named as losses.csv's columns). This project's extra generator terms come in as extra_terms
(extensions.generator_terms), so the paper's step reads without them."""
import argparse
import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from common import UserError, cap_heap_growth
from lean_lstm import unrolled
from models import with_class_channels
from run_dir import LOSS_COLUMNS
from runtime import CHUNKED_MMAP_THRESHOLD, average_gradients, bf16_lstm_supported, chunk_count, set_tf32, unwrap


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, lambda_term: float,
                     norm: str = "paper", eta: torch.Tensor | None = None, features: int | None = None
                     ) -> torch.Tensor:
    """lambda * E[(||grad critic(x_hat)|| - 1)^2] at random interpolates x_hat of real and fake [B, T, F].
    norm 'paper' takes the 2-norm over time per (sample, feature), as the original's norm(2, dim=1);
    'sample' takes it over all of a sample's steps and features, as Gulrajani et al.
    eta [B, 1, 1]: the interpolation weights, drawn here when not given. features: only the first `features`
    channels are the sequence (conditional: the class channels after them, equal in real and fake, are not)."""
    if eta is None:   # sized from the actual batch (the original crashed on a short last batch)
        eta = torch.rand(len(real), 1, 1, device=real.device)
    interpolated = (eta * real + (1 - eta) * fake).requires_grad_(True)
    score = critic(interpolated)
    grad, = torch.autograd.grad(score, interpolated, grad_outputs=torch.ones_like(score), create_graph=True)
    grad = grad if features is None else grad[..., :features]
    grad_norm = grad.norm(2, dim=1) if norm == "paper" else grad.flatten(1).norm(2, dim=1)
    return ((grad_norm - 1) ** 2).mean() * lambda_term


class BatchSampler:
    """One persistent shuffled pass after another over the real windows (the original rebuilt its loader
    iterator at every critic step). The last batch of a pass may be short, as with DataLoader(drop_last=False).
    Its state is part of the checkpoint, so a resumed run draws the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm, self.pos = None, 0

    def next_indices(self) -> torch.Tensor:
        if self.perm is None or self.pos >= self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        return idx

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"], state["pos"]


@dataclass
class WGANGPSettings:
    """The step's settings (flags -gp, --gp-norm, -dts, --critic-chunk, --precision, --generator-ema)."""
    lambda_term: float = 10.0
    gp_norm: str = "paper"
    critic_steps: int = 5
    critic_chunk: int = 0
    precision: str = "fp32"
    generator_ema: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "WGANGPSettings":
        return cls(args.gradient_penalty_lambda_term, args.gp_norm, args.discriminator_train_steps,
                   args.critic_chunk, args.precision, args.generator_ema)


class WGANGP:
    """Generator G and critic D, their optimizers and the batch sampler over the real windows [n, T, F] (on the
    training device). One epoch: critic_steps critic steps, then one generator step, whose loss adds the
    extra_terms (none in the paper). With world > 1 (torchrun) each process holds the same networks and its own share
    of the batch; gradients are averaged."""

    def __init__(self, generator: nn.Module, critic: nn.Module, g_optim: torch.optim.Optimizer,
                 d_optim: torch.optim.Optimizer, real: torch.Tensor, batch_size: int, seed: int,
                 settings: WGANGPSettings, world: int = 1, classes: torch.Tensor | None = None,
                 extra_terms: Sequence[Callable[..., torch.Tensor]] = ()):
        self.G, self.D, self.g_optim, self.d_optim = generator, critic, g_optim, d_optim
        self.real, self.device, self.settings, self.world = real, real.device, settings, world
        # conditional (--condition): each real window's class; None keeps the unconditional step op for op
        self.classes = None if classes is None else classes.to(self.device)
        self.n_classes = getattr(unwrap(generator), "n_classes", 0)
        self.batch_size = batch_size
        self.sampler = BatchSampler(len(real), batch_size, seed)
        if settings.precision == "bf16" and not bf16_lstm_supported(self.device):
            raise UserError("--precision bf16: this CPU has no bfloat16 LSTM kernels (oneDNN); use --precision fp32 "
                            "(bf16 is meant for GPUs)")
        set_tf32(settings.precision)
        # in chunks on the CPU, each chunk's freed graph fragments glibc's heap and the RSS grows with the chunk
        # count (16 x 300 in chunks of 4: 2.31 GB, capped 1.29 GB, one chunk of 4 alone 1.19 GB); chunks are
        # asked for to save memory, so the cap's page faults (~20 % of the step) are paid there only
        chunked = 0 < settings.critic_chunk < batch_size and self.device.type == "cpu"
        self.mmap_threshold = CHUNKED_MMAP_THRESHOLD if chunked and cap_heap_growth(CHUNKED_MMAP_THRESHOLD) else None
        # extra generator terms (this project's extensions.generator_terms; none in the paper): each takes
        # (z, fake, classes) and returns its weighted loss; a term with pairs = True compares the samples i and
        # i + B/2 of the batch, which the step then draws as pairs, of one class each when conditional
        self.extra_terms = list(extra_terms)
        self.pairs = any(getattr(term, "pairs", False) for term in self.extra_terms)
        # --generator-ema: a running average of the generator's weights, the one that is sampled and evaluated
        self.G_ema = copy.deepcopy(unwrap(generator)).eval().requires_grad_(False) if settings.generator_ema else None

    def noise(self, n: int, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self.conditioned(torch.randn(n, self.real.shape[1], unwrap(self.G).input_dim, device=self.device),
                                classes)

    def conditioned(self, x: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        return with_class_channels(x, classes, self.n_classes)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.settings.precision == "bf16")

    def critic_step(self) -> torch.Tensor:
        """One critic update; -> [d_loss, d_real, d_fake, gp] (d_loss = d_fake - d_real + gp)."""
        s, autocast = self.settings, self.autocast()
        idx = self.sampler.next_indices().to(self.device)
        real, classes = self.real[idx], None if self.classes is None else self.classes[idx]
        b = len(real)
        with torch.no_grad(), autocast:   # the critic's loss needs no generator gradients
            fake = self.G(self.noise(b, classes)).float()
        self.d_optim.zero_grad(set_to_none=True)
        # critic_chunk (0: whole batch) runs the passes below on balanced chunks of samples, each chunk's means
        # weighted by its share: exact up to rounding, and each chunk's graph is freed before the next, so the
        # step's peak memory follows the chunk, not the batch
        n_chunks = chunk_count(b, s.critic_chunk)
        parts = [slice(b * i // n_chunks, b * (i + 1) // n_chunks) for i in range(n_chunks)]
        d_real, d_fake, gp = (torch.zeros((), device=self.device) for _ in range(3))
        # real and fake in one forward and one backward (cuDNN allowed): the critic has no cross-sample coupling
        # (InstanceNorm and LSTMs are per sample), so this equals two separate calls up to rounding
        for part in parts:
            n, share = part.stop - part.start, (part.stop - part.start) / b
            both = None if classes is None else classes[part].repeat(2)
            with autocast:
                scores = self.D(self.conditioned(torch.cat([real[part], fake[part]]), both)).float()
            d_real_part, d_fake_part = scores[:n].mean() * share, scores[n:].mean() * share
            (d_fake_part - d_real_part).backward()
            d_real, d_fake = d_real + d_real_part.detach(), d_fake + d_fake_part.detach()
        # The penalty needs a double backward, which the fused RNN kernels lack (cuDNN raises; oneDNN falls back
        # to a slow generic path) and which torch's native cells make hold one weight-sized gradient per time
        # step: the critic's LeanLSTMs run unrolled instead (lean_lstm.py). cuDNN stays off for any other RNN.
        eta = torch.rand(b, 1, 1, device=self.device)   # one draw for the whole batch, whatever the chunks
        for part in parts:
            share = (part.stop - part.start) / b
            c = None if classes is None else classes[part]
            with unrolled(self.D), torch.backends.cudnn.flags(enabled=False), autocast:
                gp_part = gradient_penalty(self.D, self.conditioned(real[part], c), self.conditioned(fake[part], c),
                                           s.lambda_term, s.gp_norm, eta[part], real.shape[2]).float() * share
            gp_part.backward()
            gp += gp_part.detach()
        if self.world > 1:
            average_gradients(self.D, self.world)
        self.d_optim.step()
        return torch.stack([d_fake - d_real + gp, d_real, d_fake, gp]).detach()

    def generator_step(self) -> torch.Tensor:
        self.D.requires_grad_(False)   # only the generator's gradients are needed
        self.g_optim.zero_grad(set_to_none=True)
        pairs, b = self.pairs, self.batch_size
        classes = None   # conditional: classes as often as the real windows have them
        if self.classes is not None:   # in pairs: sample i and i + b/2 of one class
            classes = self.classes[torch.randint(len(self.classes), (b // 2 if pairs else b,), device=self.device)]
            classes = classes.repeat(2) if pairs else classes
        with self.autocast():
            z = self.noise(2 * (b // 2) if pairs else b, classes)
            fake = self.G(z)
            score = self.D(self.conditioned(fake, classes)).float().mean()
        loss = -score
        for term in self.extra_terms:   # the noise without the class channels, the sequences as generated
            loss = loss + term(z[..., :unwrap(self.G).input_dim], fake, classes)
        loss.backward()
        if self.world > 1:
            average_gradients(self.G, self.world)
        self.g_optim.step()
        if self.G_ema is not None:
            self.update_ema()
        self.D.requires_grad_(True)
        return -score.detach()   # reported with the original's sign: lower is better for the generator

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema = beta * ema + (1 - beta) * weights after each generator step; BatchNorm's running statistics, which
        are averages already, are the generator's own."""
        beta, g = self.settings.generator_ema, unwrap(self.G)
        for ema, weight in zip(self.G_ema.parameters(), g.parameters()):
            ema.lerp_(weight, 1 - beta)
        for ema, buffer in zip(self.G_ema.buffers(), g.buffers()):
            ema.copy_(buffer)

    @property
    def sampled_generator(self) -> nn.Module:
        """The generator that snapshots save and evaluate: the running average with --generator-ema."""
        return unwrap(self.G) if self.G_ema is None else self.G_ema

    def train_epoch(self) -> dict[str, float]:
        self.G.train()
        self.D.train()
        critic = torch.stack([self.critic_step() for _ in range(self.settings.critic_steps)]).mean(0)
        values = torch.cat([self.generator_step().reshape(1), critic])
        if self.world > 1:   # the epoch's losses averaged over ranks
            dist.all_reduce(values)
            values /= self.world
        return dict(zip(LOSS_COLUMNS, values.tolist()))   # one device sync per epoch

    def state_dict(self) -> dict:
        """Networks without DataParallel's 'module.' prefix, so a checkpoint does not depend on GPU count."""
        state = {"generator": unwrap(self.G).state_dict(), "discriminator": unwrap(self.D).state_dict(),
                 "g_optim": self.g_optim.state_dict(), "d_optim": self.d_optim.state_dict()}
        if self.G_ema is not None:
            state["generator_ema"] = self.G_ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.G).load_state_dict(state["generator"])
        unwrap(self.D).load_state_dict(state["discriminator"])
        load_moments(self.g_optim, state["g_optim"])
        load_moments(self.d_optim, state["d_optim"])
        if self.G_ema is not None:   # a run that turns --generator-ema on at resume starts its average there
            self.G_ema.load_state_dict(state.get("generator_ema", state["generator"]))


def load_moments(optim: torch.optim.Optimizer, state: dict) -> None:
    """The optimizer's moments and step counts from a checkpoint, its hyperparameters (learning rate, betas, weight
    decay) as built from the flags: a flag typed on resume (e.g. -glr) takes effect rather than being overwritten by
    the saved value, and an unchanged flag gives back the saved value, so exact resume is untouched."""
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optim.param_groups]
    optim.load_state_dict(state)
    for group, values in zip(optim.param_groups, hyper):
        group.update(values)
