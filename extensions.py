"""This project's extensions beyond the paper, as tensor code with no state of a run: the extra terms of the
generator's loss (--mode-seeking, --level-mmd and its variants), built from the flags by generator_terms() for
WGANGP's extra_terms, and the functions behind two network options, the critic's voltage-residual channel
(--critic-residual) and the generator's temperature head (--temperature-damping, --temperature-bound). The paper's
step (wgan_gp.py) reads without them: the terms come in as its extra_terms; the networks (models.py) call the two
functions. This module imports no other module of the project."""
import argparse
from dataclasses import dataclass
from typing import Callable

import torch

STEP_SEGMENT = 100       # --level-steps: steps per segment (10 s at 10 Hz) of a window's step statistics

# An extra generator term: (z [B, T, noise channels], fake [B, T, F], classes [B] or None) -> a scalar loss, weighted
GeneratorTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# the critic's residual channel and the generator's temperature head

def voltage_line(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, >=2] with V and I in channels 0 and 1 -> ([B] slope of each sequence's least-squares line of V in I,
    [B, T] V about that line): metrics.resistance_line in torch and scaled units, differentiable."""
    v, i = x[..., 0], x[..., 1]
    vc, ic = v - v.mean(1, keepdim=True), i - i.mean(1, keepdim=True)
    slope = (vc * ic).sum(1, keepdim=True) / (ic * ic).sum(1, keepdim=True).clamp_min(1e-6)
    return slope.squeeze(1), vc - slope * ic


def voltage_residual(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, >=2] with V and I in channels 0 and 1 -> [B, T]: each sequence's voltage about its least-squares
    line in its current, the part of V that the cell's resistance does not explain (metrics.resistance_line's
    residual, whose spread is phys_v_residual_mv). Over a window the open-circuit voltage hardly moves, so in real
    windows it stays within ~10 mV."""
    return voltage_line(x)[1]


def temperature_head(x: torch.Tensor, onehot: torch.Tensor, class_temperature: torch.Tensor, bound: float,
                     damping: float, channel: int) -> torch.Tensor:
    """The generator's output x [B, T, F] with its temperature (channel) held: each sequence's mean temperature
    plus `damping` times the deviation from it, and with a bound (conditional), that mean held softly within
    `bound` of its class's temperature (onehot [B, 1, n_classes] @ class_temperature [n_classes, 1]).
    A cell's temperature hardly moves within a minute, and stays within a few degrees of the ambient
    temperature it is conditioned on: left free, it wanders by degrees and crosses into the next class."""
    t = x[:, :, channel:channel + 1]
    level = t.mean(dim=1, keepdim=True)
    held = level
    if bound:   # tanh: the identity near the class's temperature, never beyond the bound
        centre = onehot @ class_temperature
        squashed = centre + bound * torch.tanh((level - centre) / bound)
        # the gradient passes as through the identity: tanh's would vanish at the bound, and a sequence held
        # there would no longer be pulled back, so the generator's own level drifts ever further out
        held = level + (squashed - level).detach()
    return torch.cat([x[:, :, :channel], held + damping * (t - level), x[:, :, channel + 1:]], dim=2)


# ----------------------------------------------------------------------------------------------------------------
# the extra generator terms

def mode_seeking_term(z: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Mao et al. 2019 (MSGAN): 1 / (|G(z1) - G(z2)| / |z1 - z2|), means of absolute differences, over the pairs
    (i, i + B/2) of a batch of 2 * (B/2). Small when two noises give different sequences: a conditional generator
    that ignores its noise (one sequence per class) pays for it."""
    half = len(z) // 2
    dz = (z[:half] - z[half:2 * half]).abs().mean((1, 2))
    dx = (fake[:half] - fake[half:2 * half]).abs().mean((1, 2))
    return (1 / (dx / dz + 1e-5)).mean()


def window_levels(x: torch.Tensor, steps: bool = False) -> torch.Tensor:
    """[B, T, >=3] (V, I, T first) -> [B, 5]: each window's mean V, I and T (where it sits: what the level-dominated
    flat MMD and the SOC labels follow), the resistance its voltage follows its current with, and the log of the
    spread of what that does not explain (which the SOC estimator reads as SOC moving). steps: [B, 9], with the log
    standard deviation of the V and I step differences and its ratio to their mean absolute value, each averaged
    over the window's 10 s segments: a drive cycle's current changes in sparse jumps (ratio 3.7, within 1.2x in
    nearly every window), a jitter's ratio is 1.3; per segment, so that a burst at the start of a generated window
    (a generator's start-up transient) cannot stand in for the jumps everywhere else."""
    x = x[..., :3].float()
    slope, residual = voltage_line(x)
    levels = [x.mean(1), slope[:, None], torch.log(residual.std(1) + 1e-4)[:, None]]
    if steps:
        d = x[:, 1:, :2] - x[:, :-1, :2]
        n = max(1, d.shape[1] // STEP_SEGMENT)
        d = d[:, :d.shape[1] // n * n].reshape(len(d), n, -1, 2)
        spread = torch.log(d.std(2) + 1e-5)
        levels += [spread.mean(1), (spread - torch.log(d.abs().mean(2) + 1e-5)).mean(1)]
    return torch.cat(levels, dim=1)


class LevelMatching:
    """--level-mmd: squared MMD, per class, between the generated windows' levels (window_levels) and those of the
    real windows of the class, on levels standardised by the real windows' spread, one kernel per group of levels
    (the mean levels; the resistance and residual; with --level-steps, the step differences): Gaussian kernels
    (0.25 to 2 times the real windows' median distance), or, --level-kernel energy, the distance kernel -|x - y|
    (the energy distance): the Gaussians' pull on a window several spreads off vanishes, the distance's does not;
    hybrid: Gaussians on the mean levels (which they spread as the real ones) and the distance, times
    HYBRID_ENERGY, on the others (which it pulls in from far off). Unlike the mode-seeking term, which rewards any
    difference between two samples, it asks for the real spread of levels: no more, no less. temperature: also
    each class's mean temperatures on that class's own scale (standardised by its real windows' spread, a few
    hundredths of the spread over all classes), by the energy distance times HYBRID_ENERGY: on the common scale a class
    drifting 2-4 degC off lies within every Gaussian's bandwidth and is hardly pulled back."""

    BANDWIDTHS = (0.25, 0.5, 1.0, 2.0)
    GROUPS = (slice(0, 3), slice(3, 5), slice(5, 9))   # window_levels' columns: mean levels, physics, steps
    HYBRID_ENERGY = 0.3   # the distance's weight beside the Gaussians (whose kernel values lie within 0..1)
    MAX_REAL = 4096   # real windows kept (a fixed random subset beyond): the real-real term is quadratic in them

    def __init__(self, real: torch.Tensor, classes: torch.Tensor | None, kernel: str = "gaussian",
                 steps: bool = False, temperature: bool = False):
        self.kernel_name, self.steps, self.temperature = kernel, steps, temperature
        self.groups = self.GROUPS if steps else self.GROUPS[:2]
        keep = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:self.MAX_REAL].to(real.device)
        levels = window_levels(real[keep], steps)
        self.mean, self.std = levels.mean(0), levels.std(0).clamp_min(1e-8)
        kept_classes = classes[keep] if classes is not None else torch.zeros_like(keep)
        if temperature:   # each class's mean and spread of the window mean temperature; a class all at one
            # temperature gets a hundredth of the overall spread, not a division by zero
            t = {int(c): levels[kept_classes == c, 2] for c in kept_classes.unique()}
            self.t_scale = {c: (x.mean(), x.std().nan_to_num(0).clamp_min(self.std[2] / 100)) for c, x in t.items()}
            self.real_t = {c: (x - self.t_scale[c][0]) / self.t_scale[c][1] for c, x in t.items()}
            self.real_t_term = {c: self.distance_pair_mean(x) for c, x in self.real_t.items()}
        levels = (levels - self.mean) / self.std
        sample = levels[:1024]   # already in random order
        scales = torch.tensor(self.BANDWIDTHS, device=real.device) ** 2
        self.sigma2 = [torch.cdist(sample[:, g], sample[:, g]).pow(2).flatten().median() * scales
                       for g in self.groups]
        self.real = {int(c): levels[kept_classes == c] for c in kept_classes.unique()}   # each class's real levels
        # the real-real term is a constant of the data: once, so that the term reads as the MMD itself
        self.real_term = {c: self.pair_mean(x) for c, x in self.real.items()}

    @staticmethod
    def off_diagonal_mean(m: torch.Tensor) -> torch.Tensor:
        """The mean of a square matrix of pairs over the pairs of distinct rows (0 for a single row): the unbiased
        estimate."""
        n = len(m)
        return (m.sum() - m.diagonal().sum()) / max(1, n * (n - 1))

    @staticmethod
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[n, k], [m, k] -> [n, m] Euclidean distances. The 1e-6 under the root: a window's zero distance to itself
        would give the root an infinite gradient."""
        return torch.sqrt((a[:, None] - b[None, :]).pow(2).sum(-1) + 1e-6)

    def pair_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's mean over the pairs of distinct rows of x."""
        return self.off_diagonal_mean(self.kernel(x, x))

    @classmethod
    def distance_pair_mean(cls, x: torch.Tensor) -> torch.Tensor:
        """The mean |x - x'| over the pairs of distinct entries of a 1-d x (0 for a single entry)."""
        return cls.off_diagonal_mean((x[:, None] - x[None, :]).abs())

    def class_temperature(self, t: torch.Tensor, c: int) -> torch.Tensor:
        """The energy distance between generated mean temperatures t (raw) of class c and the class's real ones,
        both on the class's scale."""
        mean, std = self.t_scale[c]
        t = ((t - mean) / std)[:, None]
        return (2 * self.distance(t, self.real_t[c][:, None]).mean() - self.off_diagonal_mean(self.distance(t, t))
                - self.real_t_term[c])

    def kernel(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """A sum of one kernel per group: a window far off in one group does not hide how near it is in another."""
        out = 0
        for n, (g, sigma2) in enumerate(zip(self.groups, self.sigma2)):
            if self.kernel_name == "gaussian" or (self.kernel_name == "hybrid" and n == 0):
                d2 = torch.cdist(a[:, g], b[:, g]).pow(2).unsqueeze(-1)
                out = out + torch.exp(-d2 / (2 * sigma2)).mean(-1) / len(self.groups)
            else:
                weight = self.HYBRID_ENERGY if self.kernel_name == "hybrid" else 1.0
                out = out - weight * self.distance(a[:, g], b[:, g]) / len(self.groups)
        return out

    def __call__(self, fake: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        """fake [B, T, >=3] -> the mean over the batch's classes of each class's squared MMD (unbiased in fake)."""
        levels = window_levels(fake, self.steps)
        f = (levels - self.mean) / self.std
        classes = torch.zeros(len(f), dtype=torch.long, device=f.device) if classes is None else classes
        terms = []
        for c in classes.unique():
            fc = f[classes == c]
            cross = self.kernel(fc, self.real[int(c)]).mean()
            terms.append(self.pair_mean(fc) - 2 * cross + self.real_term[int(c)])
            if self.temperature:
                weight = self.HYBRID_ENERGY / len(self.groups)
                terms[-1] = terms[-1] + weight * self.class_temperature(levels[classes == c, 2], int(c))
        return torch.stack(terms).mean()


class ModeSeeking:
    """--mode-seeking: weight x mode_seeking_term over the batch's pairs, on every channel (--mode-seeking-on all)
    or on the voltage alone (voltage: only a different voltage, i.e. SOC, level counts as a different sample)."""
    pairs = True   # the generator step draws its batch as pairs (i, i + B/2), one class each when conditional

    def __init__(self, weight: float, on: str = "all"):
        self.weight, self.on = weight, on

    def __call__(self, z: torch.Tensor, fake: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        seen = fake.float() if self.on == "all" else fake.float()[..., :1]
        return self.weight * mode_seeking_term(z, seen)


class LevelTerm:
    """--level-mmd: weight x LevelMatching of the generated windows against the real ones of their classes."""

    def __init__(self, weight: float, matching: LevelMatching):
        self.weight, self.matching = weight, matching

    def __call__(self, z: torch.Tensor, fake: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        return self.weight * self.matching(fake, classes)


@dataclass
class TermSettings:
    """The flags of the extra generator terms (0: off, the paper)."""
    mode_seeking: float = 0.0
    mode_seeking_on: str = "all"
    level_mmd: float = 0.0
    level_kernel: str = "gaussian"
    level_steps: bool = False
    level_temperature: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TermSettings":
        return cls(args.mode_seeking, args.mode_seeking_on, args.level_mmd, args.level_kernel, args.level_steps,
                   args.level_temperature)


def generator_terms(settings: TermSettings, real: torch.Tensor, classes: torch.Tensor | None
                    ) -> list[GeneratorTerm]:
    """The extra generator terms the flags ask for, in the order the loss adds them (mode seeking, then level
    matching); real [n, T, F] the real windows on the training device, classes [n] their classes (None:
    unconditional)."""
    terms = []
    if settings.mode_seeking:
        terms.append(ModeSeeking(settings.mode_seeking, settings.mode_seeking_on))
    if settings.level_mmd:
        classes = None if classes is None else classes.to(real.device)
        terms.append(LevelTerm(settings.level_mmd, LevelMatching(real, classes, settings.level_kernel,
                                                                 settings.level_steps, settings.level_temperature)))
    return terms
