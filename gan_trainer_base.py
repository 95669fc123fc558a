"""The WGAN-GP of the paper and the loop that trains it: WGANGP (the critic and generator steps with the gradient
penalty, built from tensors and WGANGPSettings, no files) and GANTrainerBase (device, data, SOC estimator,
resume, the run folder through RunDir, the epoch snapshot and the loop). A subclass supplies the networks and
their optimizers."""
import argparse
import copy
import hashlib
import json
import os
import platform
import random
import signal
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sklearn
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import metrics
from arg_parser import PAPER_SOC_MODEL, build_parser, merge_saved_args
from common import UserError, cap_heap_growth, resolve_device
from generate import labelled_sequences, real_steps, with_class_channels
from lean_lstm import unrolled
from lg_dataset import LGDataset, data_classes, load_sidecar
from run_dir import LOSS_COLUMNS, RunDir, read_network

PROJECT_DIR = Path(__file__).resolve().parent
SHIPPED_SOC_MODEL = PROJECT_DIR / "soc_models" / "lg_positive_temp_300_steps.h5"
# flags that change the shapes or the meaning of the saved networks: a resumed run must keep them
ARCH_FLAGS = ("generator_input_dim", "model_scale", "norm_layout", "critic_norm", "critic_readout", "generator_noise",
              "noise_time_steps", "condition", "critic_residual", "temperature_damping", "temperature_bound")
REAL_SAMPLE_SAVED = 64   # real windows kept per epoch folder for the notebook's real-vs-synthetic plots
MIN_EVAL_SAMPLES = 4     # -ess below this: too few sequences for PCA, t-SNE and the unbiased MMD
DRY_RUN_SAMPLES = 8      # sequences of the evaluation's trial run before training
STEP_SEGMENT = 100       # --level-steps: steps per segment (10 s at 10 Hz) of a window's step statistics


# ----------------------------------------------------------------------------------------------------------------
# small helpers

def project_default(path: str, default: str) -> Path:
    """Defaults are relative to the project, so the command also works when started from another folder."""
    p = Path(path)
    if path == default and not p.exists() and (PROJECT_DIR / default).exists():
        return PROJECT_DIR / default
    return p


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def set_tf32(precision: str) -> None:
    """TF32 only when asked: torch's default lets cuDNN RNNs use TF32, which is not the fp32 of the numerics."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


def rng_state(device: torch.device, sampler: "BatchSampler") -> dict:
    """This process's random streams in forms torch.load(weights_only=True) accepts (tuples, lists, tensors)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "sampler": sampler.state_dict()}


def set_rng_state(state: dict, device: torch.device, sampler: "BatchSampler") -> None:
    sampler.load_state_dict(state["sampler"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def bf16_lstm_supported(device: torch.device) -> bool:
    """CPU bf16 autocast of an LSTM needs oneDNN's bf16 kernels, which many CPUs lack (it then raises)."""
    if device.type != "cpu":
        return True
    try:
        with torch.autocast("cpu", torch.bfloat16):
            torch.nn.LSTM(3, 4, batch_first=True)(torch.randn(1, 2, 3))
        return True
    except RuntimeError:
        return False


# Peak bytes of one critic-step chunk per sample x step x critic hidden unit (summed over its LSTMs), the penalty's
# double backward on the lean path being the larger pass. Measured on the CPU at the paper's widths (RSS over the
# process's 0.5 GiB), with the recurrence as one Function (lean_lstm.py): 155 at 64 x 600 whole, 239 at 64 x 600
# in chunks of 8 (a chunk's fixed share: weights, their gradients, glibc's heap).
CRITIC_BYTES_PER_UNIT = 240
CHUNKED_MMAP_THRESHOLD = 4 << 20   # glibc's mmap threshold while the critic step runs in chunks on the CPU


def free_memory(device: torch.device) -> int:
    """Bytes the step may use: free GPU memory, or MemAvailable of the machine (Linux) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 << 30   # not Linux: assume a laptop's 8 GB


def chunk_count(batch: int, chunk: int) -> int:
    """How many balanced chunks a critic step of batch samples runs in for --critic-chunk chunk (0: the whole batch).
    No chunk of a single sample unless batch == 1: torch's CPU InstanceNorm backward is wrong for a batch of one."""
    return min(-(-batch // (chunk or batch)), max(1, batch // 2))


def auto_critic_chunk(batch: int, seq_len: int, critic_units: int, budget: int) -> int:
    """The largest chunk whose estimated peak fits in budget bytes (0: the whole batch fits)."""
    chunk = max(2, budget // (CRITIC_BYTES_PER_UNIT * seq_len * critic_units))
    return 0 if chunk >= batch else int(chunk)


def pick_critic_chunk(trainer: "GANTrainerBase") -> None:
    """--critic-chunk not given: the whole batch if its estimated peak fits in half the free memory, else the
    largest chunk that does (exact up to rounding either way). Said once; config.json records it."""
    if trainer.args.critic_chunk is not None:
        return
    batch, seq_len, devices = trainer.batch_size, trainer.seq_len, max(1, len(trainer.device_ids))
    units = sum(m.hidden_size for m in unwrap(trainer.D).modules() if isinstance(m, nn.LSTM))
    budget = free_memory(trainer.device) * devices // 2   # DataParallel splits each chunk over the GPUs
    chunk = auto_critic_chunk(batch, seq_len, units, budget)
    trainer.args.critic_chunk = chunk
    if trainer.rank == 0:
        n_chunks = chunk_count(batch, chunk)
        size = -(-batch // n_chunks)
        estimate = CRITIC_BYTES_PER_UNIT * seq_len * units * size / devices
        picked = f"{chunk} of {batch} samples, run as {n_chunks} chunks of {size}" if chunk else \
            f"whole batch of {batch} samples"
        print(f"critic chunk: {picked} (estimated peak {estimate / 2**30:.1f} "
              f"GiB of {budget * 2 / devices / 2**30:.1f} GiB free on {trainer.device}; set --critic-chunk to "
              f"choose)", flush=True)


def say_projection(trainer: "GANTrainerBase", epoch: int, seconds: float) -> None:
    """After the first epoch: what the whole run will take here, before the user waits days for it."""
    if epoch != trainer.start_epoch + 1:
        return
    a = trainer.args
    total = seconds * (a.gan_epochs - trainer.start_epoch)
    when = f"{total / 86400:.1f} days" if total >= 86400 else f"{total / 3600:.1f} h"
    print(f"first epoch: {seconds:.1f} s of training; {a.gan_epochs - trainer.start_epoch} epochs at this pace: "
          f"{when} (snapshots every -s {a.save_epoch_interval} epochs come on top)", flush=True)
    if total >= 86400 and trainer.device.type == "cpu":
        print("note: this is the paper's GPU configuration; on a CPU, --preset cpu trains a smaller network "
              "sized for it (see README)", flush=True)


def init_distributed(device_name: str) -> tuple[int, int, int]:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU. -> (rank, local, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, local, world


def average_gradients(model: nn.Module, world: int) -> None:
    """Data parallelism across processes: every rank steps with the mean of all ranks' gradients. Done by hand
    rather than with DistributedDataParallel, whose reducer does not support the penalty's double backward."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def unwrap(model: nn.Module) -> nn.Module:
    """State dicts are saved without DataParallel's 'module.' prefix so a checkpoint does not depend on GPU count."""
    return getattr(model, "module", model)



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


def mode_seeking_term(z: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Mao et al. 2019 (MSGAN): 1 / (|G(z1) - G(z2)| / |z1 - z2|), means of absolute differences, over the pairs
    (i, i + B/2) of a batch of 2 * (B/2). Small when two noises give different sequences: a conditional generator
    that ignores its noise (one sequence per class) pays for it."""
    half = len(z) // 2
    dz = (z[:half] - z[half:2 * half]).abs().mean((1, 2))
    dx = (fake[:half] - fake[half:2 * half]).abs().mean((1, 2))
    return (1 / (dx / dz + 1e-5)).mean()


def voltage_line(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, >=2] with V and I in channels 0 and 1 -> ([B] slope of each sequence's least-squares line of V in I,
    [B, T] V about that line): metrics.resistance_line in torch and scaled units, differentiable."""
    v, i = x[..., 0], x[..., 1]
    vc, ic = v - v.mean(1, keepdim=True), i - i.mean(1, keepdim=True)
    slope = (vc * ic).sum(1, keepdim=True) / (ic * ic).sum(1, keepdim=True).clamp_min(1e-6)
    return slope.squeeze(1), vc - slope * ic


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




# ----------------------------------------------------------------------------------------------------------------
# the WGAN-GP

@dataclass
class WGANGPSettings:
    """The step's settings (flags -gp, --gp-norm, -dts, --critic-chunk, --precision, --mode-seeking, --level-mmd,
    --mode-seeking-on, --level-kernel, --level-steps, --generator-ema, --level-temperature)."""
    lambda_term: float = 10.0
    gp_norm: str = "paper"
    critic_steps: int = 5
    critic_chunk: int = 0
    precision: str = "fp32"
    mode_seeking: float = 0.0
    level_mmd: float = 0.0
    mode_seeking_on: str = "all"
    level_kernel: str = "gaussian"
    level_steps: bool = False
    generator_ema: float = 0.0
    level_temperature: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "WGANGPSettings":
        return cls(args.gradient_penalty_lambda_term, args.gp_norm, args.discriminator_train_steps,
                   args.critic_chunk, args.precision, args.mode_seeking, args.level_mmd, args.mode_seeking_on,
                   args.level_kernel, args.level_steps, args.generator_ema, args.level_temperature)


class WGANGP:
    """Generator G and critic D, their optimizers and the batch sampler over the real windows [n, T, F] (on the
    training device). One epoch: critic_steps critic steps, then one generator step. With world > 1 (torchrun)
    each process holds the same networks and its own share of the batch; gradients are averaged."""

    def __init__(self, generator: nn.Module, critic: nn.Module, g_optim: torch.optim.Optimizer,
                 d_optim: torch.optim.Optimizer, real: torch.Tensor, batch_size: int, seed: int,
                 settings: WGANGPSettings, world: int = 1, classes: torch.Tensor | None = None):
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
        self.level_matching = LevelMatching(real, self.classes, settings.level_kernel, settings.level_steps,
                                            settings.level_temperature) if settings.level_mmd else None
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
        lam, b = self.settings.mode_seeking, self.batch_size
        classes = None   # conditional: classes as often as the real windows have them
        if self.classes is not None:   # --mode-seeking: as pairs, sample i and i + b/2 of one class
            classes = self.classes[torch.randint(len(self.classes), (b // 2 if lam else b,), device=self.device)]
            classes = classes.repeat(2) if lam else classes
        with self.autocast():
            z = self.noise(2 * (b // 2) if lam else b, classes)
            fake = self.G(z)
            score = self.D(self.conditioned(fake, classes)).float().mean()
        loss = -score
        if lam:   # --mode-seeking-on voltage: only a different voltage (SOC) level counts as a different sample
            seen = fake.float() if self.settings.mode_seeking_on == "all" else fake.float()[..., :1]
            loss = loss + lam * mode_seeking_term(z[..., :unwrap(self.G).input_dim], seen)
        if self.level_matching is not None:
            loss = loss + self.settings.level_mmd * self.level_matching(fake, classes)
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


# ----------------------------------------------------------------------------------------------------------------
# the trainer

def resolve_soc_model(args: argparse.Namespace) -> Path:
    """-socmp/-socm, or the model shipped in soc_models/ when the authors' default file is absent."""
    default_dir = build_parser().get_default("soc_estimator_model_path")
    path = project_default(str(Path(args.soc_estimator_model_path) / args.soc_estimator_model),
                           str(Path(default_dir) / PAPER_SOC_MODEL))
    if path.is_file():
        return path
    if args.soc_estimator_model == PAPER_SOC_MODEL and args.soc_estimator_model_path == default_dir:
        if not SHIPPED_SOC_MODEL.is_file():
            raise UserError(f"{SHIPPED_SOC_MODEL}: the shipped SOC model is missing; restore it with git or "
                            f"pass -socmp/-socm")
        print(f"notice: {path} (the authors' SOC model) is absent; using {SHIPPED_SOC_MODEL}")
        return SHIPPED_SOC_MODEL
    raise UserError(f"{path}: SOC estimator model not found; check -socmp/-socm")


def load_snapshot(gan: "WGANGP", folder: Path) -> None:
    """--init-from: a snapshot's networks into a new run's generator (and its running average) and critic."""
    for name, nets in (("generator.pth", [unwrap(gan.G), gan.G_ema]), ("discriminator.pth", [unwrap(gan.D)])):
        path = folder / name
        try:
            state = read_network(path)
            for net in nets:
                if net is not None:
                    net.load_state_dict(state)
        except Exception as err:   # missing, damaged, not weights, or other shapes
            raise UserError(f"{path}: cannot start from this snapshot ({type(err).__name__}: "
                            f"{' '.join(str(err).split())[:120]}); pass a <run>/<N>_epoch folder of a run with the "
                            f"same architecture flags") from None


def resume_args(run: RunDir, argv: list[str] | None, world: int) -> tuple[argparse.Namespace, dict]:
    """(the run's own flags with the flags typed now applied, its checkpoint): flags typed now (e.g. -e to train
    longer) override the saved ones, except those that would change the networks; flags added since the
    checkpoint was written get their defaults."""
    checkpoint = run.read_checkpoint()
    run.read_config(), run.read_losses()   # both intact, or one line now rather than a crash at the end
    saved = checkpoint["args"]
    args = merge_saved_args(saved, argv)
    # a flag newer than the run: the run was built with what is now its default
    parser = build_parser()
    built = {k: saved.get(k, parser.get_default(k)) for k in ARCH_FLAGS}
    changed = [k for k in ARCH_FLAGS if getattr(args, k) != built[k]]
    if changed:
        flags = ", ".join(f"{k}={getattr(args, k)} (run: {built[k]})" for k in changed)
        raise UserError(f"{run.path}: incompatible architecture flags for resume: {flags}; "
                        f"drop them or start a new run")
    if len(checkpoint["rng"]) != world:
        raise UserError(f"{run.path}: the run was trained by {len(checkpoint['rng'])} process(es), not {world}; "
                        f"resume it with the same number (its random streams are per process)")
    return args, checkpoint


def shared_seed(seed: int | None, world: int) -> int:
    """--seed, or a drawn one, the same on every rank."""
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 31)
    if world > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank when it is true on any (a signal to one rank stops them all at the same epoch)."""
    if world > 1:
        box = torch.tensor([float(flag)], device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        flag = bool(box.item())
    return flag


class GANTrainerBase(ABC):
    trainer_name = "gan"

    @abstractmethod
    def build_models(self) -> tuple[nn.Module, nn.Module]:
        """Return (generator, critic) on the CPU."""

    @abstractmethod
    def build_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """Return (generator optimizer, critic optimizer) over self.G and self.D."""

    def __init__(self, args: argparse.Namespace, argv: list[str] | None = None):
        # Everything is checked before anything is written: bad input leaves no trace.
        self.rank, local_rank, self.world = init_distributed(args.device)
        self.run, self.checkpoint, self.stopped_by = None, None, None
        if args.resume_model_name is not None and args.init_from is not None:
            raise UserError(f"--init-from {args.init_from}: starts a new run, -r {args.resume_model_name} continues "
                            f"one; drop one of them")
        if args.resume_model_name is not None:
            self.run = RunDir.open(args.results_dir, args.resume_model_name)
            if self.rank == 0:   # one writer per run folder, from the first read to the end
                self.run.lock()
        try:
            self.args, self.checkpoint = resume_args(self.run, argv, self.world) if self.run else (args, None)
            self._set_device(local_rank)
            self._load_data()
            from soc_estimator import SOCEstimator
            self.soc_model_path = resolve_soc_model(self.args)
            self.soc = SOCEstimator.load(self.soc_model_path, self.device, backend=self.args.soc_backend)
            self.notebook = project_default(self.args.result_notebook, build_parser().get_default("result_notebook"))
            if not self.notebook.is_file():
                raise UserError(f"{self.args.result_notebook}: result notebook not found; pass an existing "
                                f"notebook with -n")
            self._build_gan()
            check_inputs(self)
        except BaseException:
            if self.run is not None:
                self.run.unlock()
            raise

    def _set_device(self, local_rank: int) -> None:
        a = self.args
        if self.world > 1:   # each process drives one device; its share of the batch is -b / world
            if a.batch_size % self.world:
                raise UserError(f"-b {a.batch_size}: the batch must split evenly over {self.world} processes")
            cuda = torch.cuda.is_available() and a.device != "cpu"
            self.device, self.device_ids = torch.device("cuda", local_rank) if cuda else torch.device("cpu"), []
        else:
            self.device, self.device_ids = resolve_device(a.device, a.gpus)
        self.batch_size = a.batch_size // self.world
        self.seed = shared_seed(a.seed, self.world)

    def _load_data(self) -> None:
        a = self.args
        self.data_path = project_default(a.data_path, build_parser().get_default("data_path"))
        dataset = LGDataset(self.data_path)
        self.real_data = dataset.data.numpy()                       # [n, T, 4]: V, I, T, SOC (scaled)
        self.n_features, self.seq_len = 3, dataset.seq_len          # the GAN generates V, I, T
        self.scaler = (load_sidecar(self.data_path) or {}).get("scaler")   # None: metrics skip physical units
        self.train_data = dataset.data[:, :, :self.n_features].contiguous().to(self.device)
        n = len(dataset)
        self.classes, self.class_names = condition_classes(a.condition, self.data_path, n)
        self.temperature_anchor = temperature_anchor(self.real_data, self.classes, len(self.class_names), self.scaler,
                                                     a, self.data_path)
        if self.batch_size > n:
            raise UserError(f"{self.data_path}: batch size {self.batch_size} is larger than the dataset "
                            f"({n} windows); use -b {n * self.world} or less")
        if self.seq_len <= a.soc_estimator_step:
            raise UserError(f"{self.data_path}: sequences of {self.seq_len} steps are not longer than the SOC "
                            f"estimator window (-socs {a.soc_estimator_step}); use a shorter -socs")

    def _build_gan(self) -> None:
        seed_everything(self.seed)   # same seed on every rank: identical initial networks
        generator, critic = self.build_models()
        self.G, self.D = generator.to(self.device), critic.to(self.device)
        if len(self.device_ids) > 1:
            self.G = nn.DataParallel(self.G, device_ids=self.device_ids)
            self.D = nn.DataParallel(self.D, device_ids=self.device_ids)
        g_optim, d_optim = self.build_optimizers()
        pick_critic_chunk(self)
        if self.world > 1:   # ... but each rank its own noise and its own batches
            seed_everything(self.seed + self.rank)
        self.gan = WGANGP(self.G, self.D, g_optim, d_optim, self.train_data, self.batch_size, self.seed + self.rank,
                          WGANGPSettings.from_args(self.args), self.world, self.classes)
        self.start_epoch = 0
        self.best = {"g_loss": float("inf"), "g_epoch": 0, "d_loss": float("inf"), "d_epoch": 0}
        if self.checkpoint is not None:
            self.gan.load_state_dict(self.checkpoint)
            self.start_epoch, self.best = self.checkpoint["epoch"], self.checkpoint["best"]
            set_rng_state(self.checkpoint["rng"][self.rank], self.device, self.gan.sampler)
        elif self.args.init_from is not None:
            load_snapshot(self.gan, Path(self.args.init_from))

    # ---- the run folder ---------------------------------------------------------------------------------------

    def _open_run(self) -> None:
        if self.checkpoint is None:
            self.args.seed = self.seed
            self.run = RunDir.create(self.args.results_dir, self.trainer_name)
            self.run.lock()
            self.run.write_config(run_config(self))
            self.run.save_copy(self.notebook, "result.ipynb")
            self.run.start_losses()
        else:
            self.run.truncate_losses(self.start_epoch)
            self.run.record_resume(self.start_epoch, vars(self.args))

    def save_checkpoint(self, epoch: int) -> None:
        """Every rank's random streams go in (one list entry per rank); only rank 0 writes."""
        rng = [rng_state(self.device, self.gan.sampler)]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, rng_state(self.device, self.gan.sampler))
        if self.rank == 0:
            self.run.write_checkpoint({**self.gan.state_dict(), "epoch": epoch, "best": self.best,
                                       "args": vars(self.args), "rng": rng})

    def _record(self, epoch: int, losses: dict[str, float]) -> None:
        self.run.append_losses(epoch, losses)
        for net, key, name in ((self.G, "g", "best_generator"), (self.D, "d", "best_discriminator")):
            if losses[f"{key}_loss"] < self.best[f"{key}_loss"]:
                self.best[f"{key}_loss"], self.best[f"{key}_epoch"] = losses[f"{key}_loss"], epoch
                self.run.write_best(name, unwrap(net).state_dict(), losses[f"{key}_loss"], epoch)

    # ---- evaluation -------------------------------------------------------------------------------------------

    def snapshot(self, epoch: int) -> None:
        """<epoch>_epoch/: the networks and the evaluation's arrays and metrics.json, complete or absent."""
        def fill(folder: Path) -> None:
            torch.save(self.gan.sampled_generator.state_dict(), folder / "generator.pth")
            torch.save(unwrap(self.D).state_dict(), folder / "discriminator.pth")
            arrays, quality = evaluation(self, epoch, self.args.evaluate_sample_size)
            for name, array in arrays.items():
                np.save(folder / f"{name}.npy", array)
            (folder / "metrics.json").write_text(json.dumps(quality, indent=2))
        self.run.commit_epoch(epoch, fill)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def before_first_epoch(self) -> None:
        """Runs once, after the run folder is open and before the first epoch of this process."""

    def train(self) -> Path | None:
        """Train from self.start_epoch to -e; rank 0 alone writes the results folder and prints."""
        lead = self.rank == 0
        if lead:
            self._open_run()
            print(f"{'Resuming' if self.checkpoint else 'Start training'}: {self.run.path} on {self.device} "
                  f"x{self.world} (seed {self.seed}, data {tuple(self.real_data.shape)}, "
                  f"from epoch {self.start_epoch + 1})", flush=True)
        self.before_first_epoch()

        def request_stop(signum, _frame):   # finish the epoch, checkpoint, exit; a second signal kills
            self.stopped_by = signum
            signal.signal(signum, signal.SIG_DFL)
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            epoch = self._train_epochs()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.run is not None:
                self.run.unlock()
        if self.world > 1:
            dist.destroy_process_group()
        if not lead:
            return None
        if self.stopped_by is not None:
            print(f"Stopped after epoch {epoch}; resume with: python train_lstm_gan.py -r {self.run.name}")
        elif self.args.execute_notebook:
            from run_notebook import execute_notebook
            print(f"Result notebook: {execute_notebook(self.run.path)}")
        return self.run.path

    def _train_epochs(self) -> int:
        """The epoch loop: train, record, snapshot and checkpoint every -s epochs, and stop at a signal after
        checkpointing the epoch. -> the last epoch trained."""
        a, lead = self.args, self.rank == 0
        bar = tqdm(total=a.gan_epochs, initial=self.start_epoch, desc="epochs") if a.show_progress_bar and lead \
            else None
        begin, epoch = time.time(), self.start_epoch
        try:
            for epoch in range(self.start_epoch + 1, a.gan_epochs + 1):
                losses = self.gan.train_epoch()
                if lead:
                    self._record(epoch, losses)
                    say_projection(self, epoch, time.time() - begin)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(g_loss=f"{losses['g_loss']:.4f}", d_loss=f"{losses['d_loss']:.4f}")
                    elif epoch % a.train_report_interval == 0:
                        print(f"[Epoch:{epoch}/{a.gan_epochs}] Time passed:{time.time() - begin:.0f}s, "
                              f"g_loss:{losses['g_loss']:.6f}, d_loss:{losses['d_loss']:.6f}", flush=True)
                if epoch % a.save_epoch_interval == 0:
                    if lead:
                        self.snapshot(epoch)
                    self.save_checkpoint(epoch)
                if any_rank(self.stopped_by is not None, self.device, self.world):
                    break
            if epoch % a.save_epoch_interval != 0:
                self.save_checkpoint(epoch)
        finally:
            if bar is not None:
                bar.close()
        return epoch


def condition_classes(condition: str, data_path: Path, n: int) -> tuple[torch.Tensor | None, list[str]]:
    """--condition temperature: each window's ambient temperature class, from the data sidecar's file_index
    (which windows come from which file) -> (int64 [n], class names); (None, []) when unconditional."""
    if condition == "none":
        return None, []
    classes, names = data_classes(data_path, n)
    return torch.from_numpy(classes), names


def temperature_anchor(real: np.ndarray, classes: torch.Tensor | None, n_classes: int, scaler: dict | None,
                       args: argparse.Namespace, data_path: Path) -> tuple[list[float], float] | None:
    """--temperature-bound: (each class's real mean temperature, the bound), in the data's scaled units."""
    if not args.temperature_bound:
        return None
    if classes is None or scaler is None:
        raise UserError(f"--temperature-bound {args.temperature_bound}: bounds each temperature class; needs "
                        f"--condition temperature and {data_path}'s sidecar scaler")
    unit = scaler["max"][2] - scaler["min"][2]   # degC per scaled unit
    centres = [float(real[classes.numpy() == k, :, 2].mean()) for k in range(n_classes)]
    return centres, args.temperature_bound / unit


def run_config(trainer: GANTrainerBase) -> dict:
    """config.json of a new run: its flags, where it ran, its data (path and SHA-256) and SOC model."""
    t = trainer
    return {
        "args": vars(t.args), "result_name": t.run.name, "command": sys.argv,
        "device": str(t.device), "device_ids": t.device_ids, "world_size": t.world, "seed": t.seed,
        "seq_len": t.seq_len, "n_windows": len(t.train_data), "condition_classes": t.class_names,
        "condition_shares": [] if t.classes is None else (np.bincount(t.classes.numpy()) / len(t.classes)).tolist(),
        "data_path": str(t.data_path), "data_sha256": sha256(t.data_path), "scaler": t.scaler,
        "soc_model": str(t.soc_model_path), "soc_backend": t.args.soc_backend,
        "temperature_anchor": t.temperature_anchor,
        "init_from_sha256": None if t.args.init_from is None else {
            name: sha256(Path(t.args.init_from) / name) for name in ("generator.pth", "discriminator.pth")},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "sklearn": sklearn.__version__},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def evaluation(trainer: GANTrainerBase, epoch: int, n: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """An epoch's evaluation: n labelled synthetic sequences, a real sample, PCA, t-SNE and the quality metrics
    (those of evaluate.py). Its randomness is separate from training's: the same epoch gives the same files."""
    t, a = trainer, trainer.args
    eval_seed = (t.seed * 1_000_003 + epoch) % 2 ** 63
    idx = np.random.default_rng(eval_seed).integers(len(t.real_data), size=n)   # with replacement, as the original
    classes = None if t.classes is None else t.classes.numpy()[idx]   # conditional: the real sample's classes
    generator = t.gan.sampled_generator
    training = generator.training
    generator.eval()
    try:
        fake, _ = labelled_sequences(generator, t.soc, n, eval_seed, a.soc_estimator_step, a.batch_size, t.device,
                                     classes=classes)
    finally:
        generator.train(training)

    def real(rows: np.ndarray, segment: str = "aligned") -> np.ndarray:
        return real_steps(t.real_data[rows], t.seq_len, a.soc_estimator_step, segment)
    arrays = {"fake_data": fake, "real_data": real(idx[:REAL_SAMPLE_SAVED])}
    nonfinite = float(1 - np.isfinite(fake).mean())
    if nonfinite > 0:   # a diverged generator: recorded (no embedding or metric of NaNs), training goes on
        return arrays, {"nonfinite_share": nonfinite}
    arrays.update(metrics.pca_tsne(real(idx, a.pca_segment), fake, seed=eval_seed % 2 ** 32))
    # distinct windows for the metrics: one window on both sides of a post-hoc split would flatter the scores
    distinct, seed = real(np.unique(idx)), eval_seed % 2 ** 32
    if a.eval_metrics == "quick":
        return arrays, metrics.quick_metrics(distinct, fake, t.scaler, seed) | per_class_metrics(t, idx, fake, seed,
                                                                                                  distinct)
    # --eval-metrics all: TSTR on the shipped real test cycles when their window matches -socs
    test_path = PROJECT_DIR / "data" / "lg_test_300_data.npy"
    test = np.load(test_path) if test_path.is_file() else None
    if test is not None and test.shape[1] != distinct.shape[1]:
        test = None
    return arrays, metrics.all_metrics(distinct, fake, t.scaler, seed, t.device, test_windows=test,
                                       train_windows=t.real_data)


def per_class_metrics(trainer: GANTrainerBase, idx: np.ndarray, fake: np.ndarray, seed: int,
                      distinct: np.ndarray) -> dict[str, float]:
    """Conditional runs: every quick metric of each class's synthetic sequences (drawn for the windows idx) against
    the distinct real windows of that class (distinct: windows np.unique(idx), their compared steps)."""
    t = trainer
    if t.classes is None:
        return {}
    classes = t.classes.numpy()
    return metrics.per_class(distinct, classes[np.unique(idx)], fake, classes[idx], t.class_names, t.scaler, seed,
                             min_fake=MIN_EVAL_SAMPLES)


def check_inputs(trainer: GANTrainerBase) -> None:
    """What would otherwise fail only at the first -s snapshot, hours in: checked now, then the evaluation runs
    once on a few sequences (its files are not written) so that whatever remains fails in seconds."""
    t, a = trainer, trainer.args
    if t.soc.n_features != t.n_features:
        raise UserError(f"{t.soc_model_path}: the SOC model takes {t.soc.n_features} inputs, the GAN labels V, I, "
                        f"T ({t.n_features}); pass a model trained on V, I, T with -socmp/-socm")
    if min(a.soc_estimator_step, t.seq_len - a.soc_estimator_step) < 2:
        raise UserError(f"-socs {a.soc_estimator_step}: the evaluation keeps L = min(socs, T - socs) steps of each "
                        f"{t.seq_len}-step sequence, here fewer than 2; use -socs {t.seq_len - 2} or less")
    if a.mode_seeking and t.batch_size < 2:
        raise UserError(f"--mode-seeking {a.mode_seeking}: the generator step compares pairs of samples, and each "
                        f"process has a batch of {t.batch_size}; use -b {2 * t.world} or more, or --mode-seeking 0")
    if a.evaluate_sample_size < MIN_EVAL_SAMPLES:
        raise UserError(f"-ess {a.evaluate_sample_size}: the evaluation (PCA, t-SNE, metrics) needs at least "
                        f"{MIN_EVAL_SAMPLES} sequences; use -ess {MIN_EVAL_SAMPLES} or more")
    if t.checkpoint is not None and sha256(t.data_path) != t.run.read_config().get("data_sha256"):
        raise UserError(f"{t.data_path}: not the data this run was trained on (its SHA-256 differs from "
                        f"config.json's data_sha256); resume with the run's own data (drop -d) or start a new run")
    saved = rng_state(t.device, t.gan.sampler)   # the dry run must not move training's random streams
    try:
        evaluation(t, 0, min(a.evaluate_sample_size, DRY_RUN_SAMPLES))
    except UserError:
        raise
    except Exception as err:   # whatever the checks above missed, as one line instead of a late traceback
        raise UserError(f"the evaluation failed on a trial sample before training ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]}); check -ess, -socs, --eval-metrics and the SOC "
                        f"model") from None
    finally:
        set_rng_state(saved, t.device, t.gan.sampler)
