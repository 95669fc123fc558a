"""
Speed of one WGAN-GP critic iteration and one generator iteration, the original algorithm ('reference', as the
paper's code ran it) side by side with this project's training path ('fast'), plus SOC-labelling throughput.
Prints one JSON line per measurement, then whether both give the same losses for the same seed and batches.

    python bench.py --device cuda                     # the paper config: batch 64, 600 steps, -gid 128, scale 1
    python bench.py --device cuda --batch 512 --impl fast --critic-chunk 128
    python bench.py --device cuda --precision bf16
    python bench.py --device cpu --quick              # a smoke run, under a minute on 2 cores
    python bench.py --device cpu --scale 0.125 --steps 3

'reference' is written here, from the original loop (KeiLongW/synthetic-battery-data, GANTrainerBase._do_training):
the loader iterator rebuilt at every critic step, the fake batch made with generator gradients and the critic's
fake loss back-propagated into the generator, three separate critic forwards (real, fake, interpolates), cuDNN
off around the penalty, and one host sync per critic step (the original printed every step's losses). It uses
the project's Generator/Discriminator (same networks, same numerics) and draws its noise on the device, like the
fast path, so that the same seed gives the same numbers. On the CPU it runs torch's defaults, as the original
would: oneDNN LSTM kernels everywhere, the penalty included. 'fast' is WGANGP.critic_step/generator_step
(wgan_gp.py), built in memory: bench.py writes no file.
Both run under the same TF32 flags (--precision fp32: TF32 off, also in cuDNN, where torch's default allows it).
"""
import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import metrics
from arg_parser import parse_arg
from common import (GLIBC_MMAP_THRESHOLD_MAX, OneLineParser, cap_heap_growth, cli, int_at_least, resolve_device,
                    seed_type)
from models import build_critic, build_generator
from runtime import set_tf32, unwrap
from sampling import labelled_sequences, real_steps
from soc_estimator import SOCLSTM, SOCEstimator
from train_lstm_gan import build_optimizers
from wgan_gp import WGANGP, WGANGPSettings

ROOT = Path(__file__).resolve().parent
REAL_DATA = ROOT / "data" / "lg_600_data.npy"
# keys of every JSON line (tests/test_bench.py checks them)
KEYS = ("measure", "impl", "device", "device_name", "dtype", "precision", "batch", "seq_len", "scale", "gid",
        "steps", "seconds", "seconds_all", "peak_memory_bytes", "memory_kind", "ratio_reference_over_fast",
        "torch", "threads")
# reference and fast losses agree to this (the fast path batches the real and fake forwards: rounding only)
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5


# --quick: tiny shapes, the defaults of the flags not typed (typed flags still win)
QUICK = {"batch": 16, "scale": 0.0625, "seq_len": 60, "gid": 16, "steps": 3, "warmup": 1, "check_steps": 2}


def _scale(text: str) -> float:
    value = float(text)
    if not 0 < value <= 64:   # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a number in (0, 64], got {text}")
    return value


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int_at_least(1), default=64)
    p.add_argument("--scale", type=_scale, default=1.0, help="--model-scale of both networks")
    p.add_argument("--seq-len", type=int_at_least(2), default=600)
    p.add_argument("--gid", type=int_at_least(1), default=128, help="generator input dimension (-gid)")
    p.add_argument("--steps", type=int_at_least(1), default=5, help="timed repetitions; the median is reported")
    p.add_argument("--warmup", type=int_at_least(0), default=1,
                   help="untimed repetitions first (allocator, cuDNN plans)")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--impl", choices=["both", "fast", "reference"], default="both")
    p.add_argument("--critic-chunk", type=int_at_least(0), default=0,
                   help="fast path: the critic step's passes in chunks of this many samples (0: whole batch); "
                        "exact up to rounding, peak memory follows the chunk")
    p.add_argument("--data", choices=["real", "random"], default="real",
                   help="real: windows of data/lg_600_data.npy (random when absent or --seq-len > 600)")
    p.add_argument("--check-steps", type=int_at_least(0), default=3,
                   help="critic steps of the equal-loss check (0: skip)")
    p.add_argument("--label-seqs", type=int_at_least(0), default=None,
                   help="sequences labelled for the throughput figure (default 4000 on cuda, 4 on cpu)")
    p.add_argument("--eval-seqs", type=int_at_least(0), default=0, metavar="N",
                   help="also time the trainer's snapshot evaluation at -ess N: generate + label N sequences, "
                        "then PCA and t-SNE of N real and N synthetic (0: skip)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one fast critic step (torch.profiler) and print its top operators")
    p.add_argument("--cuda-graph", action="store_true",
                   help="experimental, CUDA only: also time the fast critic step captured as one CUDA graph and "
                        "replayed (a fixed real batch; the eager step launches ~10^5 small kernels at 600 steps)")
    p.add_argument("--seed", type=seed_type, default=0)
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (batch 16, scale 1/16, 60 steps, -gid 16, 3 steps): a smoke run in well under a "
                        "minute; typed flags still win")
    cfg = p.parse_args(argv)
    if cfg.quick:   # every shape small unless typed; the code path is the same
        p.set_defaults(**QUICK)
        cfg = p.parse_args(argv)
        cfg.label_seqs = 4 if cfg.label_seqs is None else cfg.label_seqs
        # tiny shapes run fastest on one thread; two threads on two busy cores spin in OpenMP barriers
        cfg.threads = cfg.threads or (1 if cfg.device == "cpu" else 0)
    if cfg.label_seqs is None:
        cfg.label_seqs = 4000 if cfg.device.startswith("cuda") else 4
    return cfg


# -----------------------------------------------------------------------------
# the machine

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores)"


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    status = Path("/proc/self/status")
    if status.is_file():   # Linux: the RSS high-water mark since reset_peak_memory (KiB)
        hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        return int(hwm.split()[1]) * 1024, "rss_high_water"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_high_water"


def reset_peak_memory(device: torch.device) -> None:
    """So that each implementation's peak is its own: on Linux the RSS high-water mark can be reset (to the
    current RSS); elsewhere the CPU figure stays process-wide."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# -----------------------------------------------------------------------------
# the fast path: the project's WGANGP, built in memory with the trainer's flags

def gan_args(cfg: argparse.Namespace) -> argparse.Namespace:
    """train_lstm_gan.py's flags for this shape: every other hyperparameter is the paper's default."""
    return parse_arg(["-b", str(cfg.batch), "-gid", str(cfg.gid), "--model-scale", str(cfg.scale),
                      "--precision", cfg.precision, "--critic-chunk", str(cfg.critic_chunk), "--seed", str(cfg.seed)])


def real_windows(cfg: argparse.Namespace) -> np.ndarray:
    """[n, T, 3] scaled V, I, T: windows of the shipped data, or uniform noise when absent or T > 600."""
    if cfg.data == "real" and REAL_DATA.is_file() and cfg.seq_len <= 600:
        return np.ascontiguousarray(np.load(REAL_DATA, mmap_mode="r")[:, :cfg.seq_len, :3], dtype=np.float32)
    return np.random.default_rng(cfg.seed).random((max(4 * cfg.batch, 256), cfg.seq_len, 3), dtype=np.float32)


def make_gan(cfg: argparse.Namespace) -> WGANGP:
    """The trainer's WGANGP as train_lstm_gan.py builds it for one process (seeded, then networks, optimizers)."""
    args, (device, _) = gan_args(cfg), resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    generator, critic = build_generator(args, cfg.seq_len).to(device), build_critic(args).to(device)
    g_optim, d_optim = build_optimizers(args, generator, critic)
    real = torch.from_numpy(real_windows(cfg)).to(device)
    return WGANGP(generator, critic, g_optim, d_optim, real, cfg.batch, cfg.seed, WGANGPSettings.from_args(args))


def soc_window(seq_len: int) -> int:
    return min(300, seq_len // 2)   # the paper's 300 steps, or half of a shorter sequence


# -----------------------------------------------------------------------------
# the reference: the original loop

class Reference:
    """The original WGAN-GP iteration, on copies of the WGANGP's networks and fresh Adam optimizers."""

    def __init__(self, gan: WGANGP, cfg: argparse.Namespace):
        args, self.device = gan_args(cfg), gan.device
        self.batch_size, self.seq_len, self.gid = args.batch_size, cfg.seq_len, args.generator_input_dim
        self.lambda_term = args.gradient_penalty_lambda_term
        self.G = build_generator(args, self.seq_len).to(self.device)
        self.D = build_critic(args).to(self.device)
        self.g_optim, self.d_optim = build_optimizers(args, self.G, self.D)
        self.copy_state(gan)
        self.dataset = gan.real.cpu()   # the original kept its dataset on the host
        self.real_batch = self.loader_batch

    def copy_state(self, gan: WGANGP) -> None:
        """Same weights and optimizer moments as the WGANGP now (deep copies: nothing is shared)."""
        self.G.load_state_dict(unwrap(gan.G).state_dict())
        self.D.load_state_dict(unwrap(gan.D).state_dict())
        self.g_optim.load_state_dict(copy.deepcopy(gan.g_optim.state_dict()))
        self.d_optim.load_state_dict(copy.deepcopy(gan.d_optim.state_dict()))

    def loader_batch(self) -> torch.Tensor:
        # defect 2: a new loader iterator (and a new shuffle of the whole dataset) at every critic step
        return next(iter(DataLoader(self.dataset, self.batch_size, shuffle=True))).to(self.device)

    def penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        # defect 3: eta sized from the configured batch; norm(2, dim=1) is over time (the paper's penalty)
        eta = torch.rand(self.batch_size, 1, 1, device=self.device).expand_as(real)
        x = (eta * real + (1 - eta) * fake).requires_grad_(True)
        score = self.D(x)
        grad, = torch.autograd.grad(score, x, grad_outputs=torch.ones_like(score), create_graph=True,
                                    retain_graph=True)
        return ((grad.norm(2, dim=1) - 1) ** 2).mean() * self.lambda_term

    def critic_step(self) -> list[float]:
        for p in self.D.parameters():
            p.requires_grad = True
        self.d_optim.zero_grad()
        real = self.real_batch()
        d_real = self.D(real).mean()
        (-d_real).backward()
        z = torch.randn(self.batch_size, self.seq_len, self.gid, device=self.device)
        fake = self.G(z)   # defect 4: with generator gradients, and the backward below runs through G
        d_fake = self.D(fake).mean()
        d_fake.backward()
        with torch.backends.cudnn.flags(enabled=False):
            gp = self.penalty(real.data, fake.data)
            gp.backward()
        self.d_optim.step()
        # the original printed every step's losses and summed .item()s: one host sync per critic step
        return [(d_fake - d_real + gp).item(), d_real.item(), d_fake.item(), gp.item()]

    def generator_step(self) -> float:
        for p in self.D.parameters():
            p.requires_grad = False
        self.g_optim.zero_grad()
        z = torch.randn(self.batch_size, self.seq_len, self.gid, device=self.device)
        g_loss = self.D(self.G(z)).mean()
        (-g_loss).backward()
        self.g_optim.step()
        for p in self.D.parameters():   # ready for the next critic step
            p.requires_grad = True
        return -g_loss.item()


# -----------------------------------------------------------------------------
# measurements

def timed(fn, steps: int, warmup: int, device: torch.device) -> tuple[list[float], int, str]:
    """Seconds of each of `steps` calls after `warmup` untimed ones, and the peak memory over all of them."""
    reset_peak_memory(device)
    for _ in range(warmup):
        fn()
    sync(device)
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds, *peak_memory(device)


def line(cfg: argparse.Namespace, device: torch.device, measure: str, impl: str, seconds: list[float],
         memory: tuple[int, str], **extra) -> dict:
    dtype = {"fp32": "float32", "tf32": "float32 (TF32 math)", "bf16": "bfloat16 autocast"}[cfg.precision]
    return {"measure": measure, "impl": impl, "device": str(device), "device_name": device_name(device),
            "dtype": dtype, "precision": cfg.precision, "batch": cfg.batch, "seq_len": cfg.seq_len,
            "scale": cfg.scale, "gid": cfg.gid, "steps": len(seconds),
            "seconds": statistics.median(seconds) if seconds else None,
            "seconds_all": [round(s, 6) for s in seconds], "peak_memory_bytes": memory[0], "memory_kind": memory[1],
            "ratio_reference_over_fast": None, "torch": torch.__version__, "threads": torch.get_num_threads(),
            **extra}


def measure_training(cfg: argparse.Namespace, gan: WGANGP, reference: Reference | None) -> list[dict]:
    """Critic and generator iterations. The two implementations alternate step by step, so that a busy machine
    slows both alike; on a GPU each call's peak memory is its own (both sets of weights stay resident, ~0.3 GB
    at scale 1), on the CPU the RSS high-water mark is process-wide. An out-of-memory step is reported."""
    impls = {"fast": (gan.critic_step, gan.generator_step)}
    if reference is not None:
        impls["reference"] = (reference.critic_step, reference.generator_step)
    if cfg.impl != "both":
        impls = {cfg.impl: impls[cfg.impl]}
    device, lines = gan.device, []
    for k, measure in enumerate(("critic_step", "generator_step")):
        seconds, memory, errors = {i: [] for i in impls}, {i: 0 for i in impls}, {}
        for rep in range(cfg.warmup + cfg.steps):
            for impl, fns in impls.items():
                if impl in errors:
                    continue
                set_tf32(cfg.precision)
                if device.type == "cpu":   # the reference's oneDNN penalty needs the cap; the fast path only in chunks
                    cap_heap_growth(4 << 20 if impl == "reference" else gan.mmap_threshold or GLIBC_MMAP_THRESHOLD_MAX)
                # the fast path applies --precision itself; the reference runs under the same autocast
                autocast = torch.autocast(device.type, torch.bfloat16,
                                          enabled=cfg.precision == "bf16" and impl == "reference")
                reset_peak_memory(device)
                try:
                    sync(device)
                    t0 = time.perf_counter()
                    with autocast:
                        fns[k]()
                    sync(device)
                except torch.cuda.OutOfMemoryError:
                    errors[impl] = "out of memory"
                    torch.cuda.empty_cache()
                    continue
                if rep >= cfg.warmup:
                    seconds[impl].append(time.perf_counter() - t0)
                memory[impl] = max(memory[impl], peak_memory(device)[0])
        for impl in impls:
            extra = {"error": errors[impl]} if impl in errors else {}
            lines.append(line(cfg, device, measure, impl, seconds[impl], (memory[impl], peak_memory(device)[1]),
                              **extra))
        pair = {l["impl"]: l for l in lines[-len(impls):]}
        if len(pair) == 2 and pair["fast"]["seconds"] and pair["reference"]["seconds"]:
            ratio = round(pair["reference"]["seconds"] / pair["fast"]["seconds"], 3)
            for l in pair.values():
                l["ratio_reference_over_fast"] = ratio
    return lines


def random_soc_estimator(cfg: argparse.Namespace) -> SOCEstimator:
    """The paper's SOC network with random weights: labelling costs the same whatever the weights."""
    device, _ = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    return SOCEstimator(SOCLSTM().to(device).eval(), Path("random weights"), device, "torch")


def measure_labelling(cfg: argparse.Namespace, soc: SOCEstimator) -> dict:
    """SOCEstimator.label throughput over random scaled sequences (the evaluation's labelling step)."""
    window = soc_window(cfg.seq_len)
    sequences = np.random.default_rng(cfg.seed).random((cfg.label_seqs, cfg.seq_len, 3), dtype=np.float32)
    windows = cfg.label_seqs * (cfg.seq_len - window + 1)
    if cfg.warmup:   # on a few sequences: the full set can take minutes where it is slow
        soc.label(sequences[:8], window=window)
    seconds, *memory = timed(lambda: soc.label(sequences, window=window), max(1, cfg.steps // 2), 0,
                             soc.device)
    per_s = windows / statistics.median(seconds)
    # the trainer labels -ess sequences of 600 steps with 300-step windows (301 windows each)
    return line(cfg, soc.device, "soc_label", "fast", seconds, memory, sequences=cfg.label_seqs,
                window=window, windows=windows, windows_per_s=round(per_s, 1),
                projected_seconds_ess4000=round(4000 * 301 / per_s, 2))


def measure_evaluation(cfg: argparse.Namespace, gan: WGANGP, soc: SOCEstimator) -> dict:
    """The trainer's snapshot at -ess N: N sequences generated and labelled (random-weight SOC network: the cost
    is the same), then PCA and t-SNE of N real and N synthetic sequences; seconds of each part."""
    window = soc_window(cfg.seq_len)
    generator = unwrap(gan.G).eval()
    sync(gan.device)
    t0 = time.perf_counter()
    fake = labelled_sequences(generator, soc, cfg.eval_seqs, cfg.seed, window, 256, gan.device).x
    sync(gan.device)
    t1 = time.perf_counter()
    rows = np.random.default_rng(cfg.seed).integers(len(gan.real), size=cfg.eval_seqs)
    real = real_steps(gan.real[rows.tolist()].cpu().numpy(), cfg.seq_len, window, "aligned")
    metrics.pca_tsne(real, fake[..., :3], seed=cfg.seed)
    t2 = time.perf_counter()
    generator.train()
    return line(cfg, gan.device, "evaluation", "fast", [t2 - t0], peak_memory(gan.device), sequences=cfg.eval_seqs,
                label_seconds=round(t1 - t0, 3), pca_tsne_seconds=round(t2 - t1, 3))


def profile_critic_step(gan: WGANGP, top: int = 15) -> dict:
    """torch.profiler over one fast critic step (after one untimed): the operators that take its time."""
    from torch.profiler import ProfilerActivity, profile
    gan.critic_step()
    sync(gan.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gan.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        gan.critic_step()
        sync(gan.device)
    key = "self_device_time_total" if gan.device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    print(averages.table(sort_by=key, row_limit=top), file=sys.stderr, flush=True)
    events = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
    return {"measure": "profile_critic_step", "device": str(gan.device), "sorted_by": key,
            "kernels": sum(e.count for e in averages if e.device_type.name == "CUDA"),
            "top": [{"op": e.key, "count": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1),
                     "self_device_us": round(e.self_device_time_total, 1)}
                    for e in events[:top]]}


def measure_graphed_critic(cfg: argparse.Namespace, gan: WGANGP) -> dict:
    """The fast critic step captured once as a CUDA graph, then replayed: what launch overhead costs the eager
    step. A lead, not the trainer's path: the real batch is fixed (the sampler's short last batch would need a
    second graph) and Adam runs with capturable=True. Changes gan's state: run it last."""
    device = gan.device
    try:
        batch = torch.arange(cfg.batch, device=device) % len(gan.real)
        gan.sampler.next_indices = lambda: batch   # already on the device: .to() inside the step is a no-op
        for group in gan.d_optim.param_groups:
            group["capturable"] = True
        for state in gan.d_optim.state.values():
            if "step" in state:
                state["step"] = state["step"].to(device, torch.float32)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):   # warm-up on a side stream, as torch.cuda.graph requires
            for _ in range(3):
                gan.critic_step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            losses = gan.critic_step()
        replays = []
        seconds, *memory = timed(lambda: (graph.replay(), replays.append(losses.tolist())), cfg.steps,
                                cfg.warmup, device)
    except Exception as e:   # experimental: report why capture failed, keep the other figures
        return {"measure": "critic_step_cuda_graph", "device": str(device), "error": f"{type(e).__name__}: {e}"}
    return line(cfg, device, "critic_step_cuda_graph", "fast", seconds, memory, losses=replays,
                finite=bool(np.isfinite(replays).all()), moved=replays[0] != replays[-1])


def check_equal_losses(cfg: argparse.Namespace, gan: WGANGP, reference: Reference) -> dict:
    """From the same weights, optimizer state, seed and real batches: `check_steps` critic steps and one generator
    step of each, in fp32 (the numerics both share). The fast path batches the real and fake forwards and runs
    the penalty on the unrolled LeanLSTMs (the reference: oneDNN on the CPU, native cells on CUDA): rounding
    differs only."""
    reference.copy_state(gan)
    sampler = copy.deepcopy(gan.sampler)   # the reference draws the very batches the fast path draws
    reference.real_batch = lambda: gan.real[sampler.next_indices().to(gan.device)]
    precision, gan.settings.precision = gan.settings.precision, "fp32"
    try:
        set_tf32("fp32")
        torch.manual_seed(cfg.seed)
        fast = [gan.critic_step().tolist() for _ in range(cfg.check_steps)]
        fast.append([gan.generator_step().item()])
        set_tf32("fp32")
        torch.manual_seed(cfg.seed)
        ref = [reference.critic_step() for _ in range(cfg.check_steps)] + [[reference.generator_step()]]
    finally:
        gan.settings.precision, reference.real_batch = precision, reference.loader_batch
    fast_flat, ref_flat = np.array(sum(fast, [])), np.array(sum(ref, []))
    diff = np.abs(fast_flat - ref_flat)
    return {"measure": "equal_losses", "precision": "fp32", "device": str(gan.device),
            "critic_steps": cfg.check_steps, "columns": "[d_loss, d_real, d_fake, gp] per critic step, [g_loss]",
            "losses_fast": fast, "losses_reference": ref, "max_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / np.maximum(np.abs(ref_flat), LOSS_ATOL)).max()),
            "rtol": LOSS_RTOL, "atol": LOSS_ATOL,
            "equal": bool(np.allclose(fast_flat, ref_flat, rtol=LOSS_RTOL, atol=LOSS_ATOL))}


# -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gan = make_gan(cfg)
    reference = Reference(gan, cfg) if cfg.impl != "fast" else None
    results = measure_training(cfg, gan, reference)
    for result in results:
        print(json.dumps(result), flush=True)
    if cfg.label_seqs:
        results.append(measure_labelling(cfg, random_soc_estimator(cfg)))
        print(json.dumps(results[-1]), flush=True)
    if cfg.eval_seqs:
        results.append(measure_evaluation(cfg, gan, random_soc_estimator(cfg)))
        print(json.dumps(results[-1]), flush=True)
    if cfg.profile:
        results.append(profile_critic_step(gan))
        print(json.dumps(results[-1]), flush=True)
    if reference is not None and cfg.check_steps:
        results.append(check_equal_losses(cfg, gan, reference))
        print(json.dumps(results[-1]), flush=True)
    if cfg.cuda_graph:
        results.append(measure_graphed_critic(cfg, gan))
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    sys.exit(cli(lambda: main(sys.argv[1:])))
