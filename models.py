"""The paper's networks: the LSTM generator and the LSTM critic (the paper's "discriminator"), their options, and
the builders that make them from the flags. Model code only: no training loop, no files. Module attribute names
match the original's, so its state dicts and every saved generator.pth / checkpoint.pt load unchanged."""
import argparse
import math

import torch
from torch import nn
from torch.nn import functional as F

from cell_model import RAW_CHANNELS, PhysicsHead
from extensions import temperature_head, voltage_residual
from lean_lstm import LeanLSTM

N_FEATURES = 3      # the GAN generates V, I, T; the SOC estimator labels them
TEMPERATURE = 2     # the temperature's channel
PHYSICS_TEMPERATURE = 1   # --generator-head physics: the temperature's channel among the head's raw channels
PHYSICS_NOISE = 4         # ... and the noise channels it reads: the last four of z's -gid (the hold's phase, sensors)
GENERATOR_WIDTHS = (1024, 512, 256, 128)   # hidden sizes of the first four generator LSTMs
CRITIC_WIDTHS = (128, 256, 512, 1024)


def scaled(width: int, scale: float) -> int:
    return max(1, round(width * scale))


def normalize(x: torch.Tensor, norm: nn.Module, layout: str) -> torch.Tensor:
    """x: [B, T, C] LSTM output. 'paper' reproduces the original's reshape(B, C, 1, T), which reinterprets the
    memory of [T, C] as [C, T] (mixing time and feature positions) and returns the result permuted back."""
    b, t, c = x.shape
    if layout == "paper":
        return norm(x.reshape(b, c, 1, t)).squeeze(2).permute(0, 2, 1)
    return norm(x.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)


class InstanceNorm(nn.Module):
    """The original's nn.InstanceNorm2d(C) (no affine, no running statistics: no state, so state dicts match),
    written out because torch's CPU kernel returns wrong gradients for a batch of one sample (torch 2.13)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [B, C, H, W], statistics per (sample, channel)
        mean = x.mean(dim=(2, 3), keepdim=True)
        var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps)


def ar1(z: torch.Tensor, time_steps: float) -> torch.Tensor:
    """i.i.d. N(0, 1) noise [B, T, C] -> a stationary AR(1) process over T with unit variance and correlation
    exp(-lag / time_steps): slow noise, as the real traces change slowly at 10 Hz."""
    a = math.exp(-1.0 / time_steps)
    b = math.sqrt(1.0 - a * a)
    out = torch.empty_like(z)
    out[:, 0] = z[:, 0]
    for t in range(1, z.shape[1]):
        out[:, t] = a * out[:, t - 1] + b * z[:, t]
    return out


class Generator(nn.Module):
    """Five stacked single-layer LSTMs (1024, 512, 256, 128, output_dim); BatchNorm + ReLU after the first four;
    no output activation. Module names match the original so its state dicts load. noise 'mixed' holds the first
    half of z's noise channels at their first step's values (a per-sequence latent; same parameters); 'smooth'
    also turns the other half into an AR(1) process with a time constant of noise_time_steps (still N(0, 1) at every
    step). Conditional: z's class channels (after the noise) reach the first LSTM as they are.
    The temperature head (no parameters: the same state dict): temperature_damping < 1 scales the temperature
    channel's deviation from its mean over the sequence; anchor (conditional) = (each class's temperature, a bound),
    in the data's scaled units: the sequence's mean temperature is held softly within the bound of its class's.
    physics (--generator-head physics) = (the cell model's parameters, the data's scaler): the last LSTM gives the
    cell_model.PhysicsHead's raw channels (a power demand, the temperature, a voltage residual, the current before
    the window) and the head makes V, I, T of them, from an SOC drawn from the data's, through the tester, the cell
    model and the sensors."""

    def __init__(self, input_dim: int, output_dim: int, seq_len: int, dropout: float = 0.0,
                 scale: float = 1.0, norm_layout: str = "paper", noise: str = "step", n_classes: int = 0,
                 noise_time_steps: float = 30.0, temperature_damping: float = 1.0,
                 anchor: tuple[list[float], float] | None = None, physics: tuple[dict, dict] | None = None):
        super().__init__()
        self.input_dim, self.output_dim, self.seq_len = input_dim, output_dim, seq_len
        self.norm_layout, self.noise, self.n_classes = norm_layout, noise, n_classes
        self.noise_time_steps, self.temperature_damping = noise_time_steps, temperature_damping
        self.bound = anchor[1] if anchor else 0.0
        # not persistent: the anchor comes from the data (config.json keeps it), state dicts stay the generator's
        centres = torch.tensor(anchor[0] if anchor else [], dtype=torch.float32).reshape(-1, 1)
        self.register_buffer("class_temperature", centres, persistent=False)
        # conditional: z carries n_classes one-hot channels after its input_dim noise channels
        widths = [input_dim + n_classes] + [scaled(w, scale) for w in GENERATOR_WIDTHS]
        for i in range(4):
            setattr(self, f"lstm_{i + 1}", nn.LSTM(widths[i], widths[i + 1], batch_first=True))
            setattr(self, f"batch_norm_{i + 1}", nn.BatchNorm2d(widths[i + 1]))
            setattr(self, f"relu_{i + 1}", nn.ReLU())
        # the head holds buffers only (not persistent): the state dict is the LSTMs', lstm_5 RAW_CHANNELS wide
        self.physics = None if physics is None else PhysicsHead(*physics)
        self.lstm_5 = nn.LSTM(widths[4], output_dim if physics is None else RAW_CHANNELS, batch_first=True)
        # single-layer nn.LSTM ignores its dropout argument, so dropout is applied between the blocks
        self.dropout = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z
        if self.noise in ("mixed", "smooth"):   # i.i.d. noise at every step gives the LSTMs nothing that lasts
            # the class channels after the noise pass unchanged (AR(1)-filtered, a one-hot 1 would climb to ~14)
            k, noise, onehot = self.input_dim // 2, z[:, :, :self.input_dim], z[:, :, self.input_dim:]
            varying = noise[:, :, k:] if self.noise == "mixed" else ar1(noise[:, :, k:], self.noise_time_steps)
            x = torch.cat([noise[:, :1, :k].expand(-1, z.shape[1], -1), varying, onehot], dim=2)
        for i in range(1, 5):
            x, _ = getattr(self, f"lstm_{i}")(x)
            x = normalize(x, getattr(self, f"batch_norm_{i}"), self.norm_layout)
            x = self.dropout(getattr(self, f"relu_{i}")(x))
        x, _ = self.lstm_5(x)
        if self.physics is not None:
            return self.physical(x, z)
        if self.temperature_damping != 1.0 or self.bound:
            x = self.temperature_head(x, z[:, :1, self.input_dim:])
        return x

    def temperature_head(self, x: torch.Tensor, onehot: torch.Tensor, channel: int = TEMPERATURE) -> torch.Tensor:
        """x [B, T, F] with the temperature held (extensions.temperature_head); onehot [B, 1, n_classes]."""
        return temperature_head(x, onehot, self.class_temperature, self.bound, self.temperature_damping, channel)

    def physical(self, raw: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The physics head on the last LSTM's raw channels, in fp32 also under bf16 autocast (the charge it counts
        over 600 steps would drift in bf16). Its noise is z's own, drawn from the seed like the rest of z."""
        with torch.autocast(raw.device.type, enabled=False):
            raw = self.temperature_head(raw.float(), z[:, :1, self.input_dim:], PHYSICS_TEMPERATURE)
            noise = z[:, :, self.input_dim - PHYSICS_NOISE:self.input_dim].float()
            return self.physics(raw, noise, raw[..., PHYSICS_TEMPERATURE], z[:, 0, 0].float(),
                                z[:, 0, self.input_dim:].float())


class Discriminator(nn.Module):
    """The WGAN critic: four stacked LSTMs (128, 256, 512, 1024), each followed by InstanceNorm (--critic-norm layer:
    a per-step layer norm) + LeakyReLU(0.2);
    the last time step's features go through Linear(1024, 1) (--critic-readout mean: every step's features, averaged
    over time; meanstd: their mean and standard deviation over time, Linear(2048, 1)). No sigmoid: it scores, it does
    not classify. Its LSTMs are LeanLSTMs (nn.LSTM with an unrolled form for the gradient penalty's double backward).
    residual > 0 (--critic-residual): the voltage residual times `residual` is one more input channel, after the
    others."""

    def __init__(self, input_dim: int, dropout: float = 0.0, scale: float = 1.0, norm_layout: str = "paper",
                 norm: str = "instance", readout: str = "last", residual: float = 0.0):
        super().__init__()
        self.input_dim, self.residual = input_dim, residual
        self.norm_layout, self.norm, self.readout = norm_layout, norm, readout
        widths = [input_dim + (1 if residual else 0)] + [scaled(w, scale) for w in CRITIC_WIDTHS]
        for i in range(4):
            setattr(self, f"lstm_{i + 1}", LeanLSTM(widths[i], widths[i + 1], batch_first=True))
            setattr(self, f"instance_norm_{i + 1}", InstanceNorm(widths[i + 1]))
            setattr(self, f"relu_{i + 1}", nn.LeakyReLU(0.2))
        # meanstd: the head reads each feature's mean and standard deviation over time
        self.linear = nn.Linear(widths[4] * (2 if readout == "meanstd" else 1), 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:   # differentiable, so the gradient penalty sees it as part of the critic; sums over time
            r = self.residual * voltage_residual(x.float())   # in fp32 also under bf16 autocast
            x = torch.cat([x, r.to(x.dtype).unsqueeze(-1)], dim=-1)
        for i in range(1, 5):
            x, _ = getattr(self, f"lstm_{i}")(x)
            if self.norm == "layer":   # per step over features: a sequence's levels stay visible to the critic
                x = F.layer_norm(x, x.shape[-1:])
            else:
                x = normalize(x, getattr(self, f"instance_norm_{i}"), self.norm_layout)
            if i < 4:
                x = self.dropout(getattr(self, f"relu_{i}")(x))
        if self.readout != "last":   # every step scored: each step's dynamics get a gradient, not the last's
            h = self.dropout(self.relu_4(x))
            if self.readout == "mean":
                return self.linear(h.mean(dim=1))
            # the spread over time shows what a mean cannot: a level that wanders within one sequence
            return self.linear(torch.cat([h.mean(dim=1), torch.sqrt(h.var(dim=1, unbiased=False) + 1e-8)], dim=1))
        # as the original: the activation is applied to the last time step only, then the linear head
        return self.linear(self.dropout(self.relu_4(x[:, -1, :])))


def build_generator(args: argparse.Namespace, seq_len: int, n_classes: int = 0,
                    anchor: tuple[list[float], float] | None = None,
                    physics: tuple[dict, dict] | None = None) -> Generator:
    """anchor: --temperature-bound's (class temperatures, bound) in scaled units (temperature_anchor()); physics:
    --generator-head physics's (cell model parameters, the data's scaler), needed with that flag."""
    if args.generator_head == "physics" and physics is None:
        raise ValueError("--generator-head physics: build_generator needs the cell model and the scaler")
    return Generator(args.generator_input_dim, N_FEATURES, seq_len, args.generator_dropout, args.model_scale,
                     args.norm_layout, args.generator_noise, n_classes, args.noise_time_steps,
                     args.temperature_damping, anchor, physics if args.generator_head == "physics" else None)


def build_critic(args: argparse.Namespace, n_classes: int = 0) -> Discriminator:
    """Conditional: the sequence's N_FEATURES channels are followed by n_classes one-hot channels."""
    return Discriminator(N_FEATURES + n_classes, args.discriminator_dropout, args.model_scale, args.norm_layout,
                         args.critic_norm, args.critic_readout, args.critic_residual)


def with_class_channels(x: torch.Tensor, classes: torch.Tensor | None, n_classes: int) -> torch.Tensor:
    """x [B, T, C] with each row's class appended as n_classes one-hot channels at every step (x when None): the
    conditional generator's noise and the conditional critic's input."""
    if classes is None:
        return x
    onehot = torch.nn.functional.one_hot(classes, n_classes).to(x.dtype)
    return torch.cat([x, onehot[:, None, :].expand(-1, x.shape[1], -1)], dim=2)
