"""Synthetic sequences from a trained run, below the trainer and the command lines: the run's generator rebuilt
from its config.json, the noise drawn from a seed, the SOC labels (the run's estimator's, the paper's, or fused:
the estimator's level plus charge counting, with a spread per sequence), the kept steps, the class shares of a
conditional run, physical units. The trainer's snapshots, generate.py, evaluate.py and bench.py all sample through
this module."""
import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from arg_parser import merge_saved_args
from cell_model import for_run as physics_for_run
from common import UserError
from lg_dataset import DataError, load_sidecar, unscale
from metrics import coulomb_gap
from models import build_generator, with_class_channels
from run_dir import read_network
from soc_estimator import FUSED_READINGS, SOCEstimator, check_scaler, reading_steps

PROJECT_DIR = Path(__file__).resolve().parent
HZ = 10                      # the LG drive cycles are logged at 10 Hz


# ----------------------------------------------------------------------------------------------------------------
# the run folder

def load_generator(config: dict, epoch_dir: Path, device: torch.device) -> torch.nn.Module:
    """The run's generator, built from its saved flags exactly as the trainer built it, with the epoch's weights."""
    args = merge_saved_args(config["args"], [])
    physics = physics_for_run(args, None, config, epoch_dir.parent)   # a physics run's own cell model and scaler
    generator = build_generator(args, config["seq_len"], len(config.get("condition_classes") or []),
                                config.get("temperature_anchor"), physics)
    path = epoch_dir / "generator.pth"
    try:
        generator.load_state_dict(read_network(path))
    except Exception as err:   # unpickling and shape mismatches: the file does not fit this run's config
        raise UserError(f"{path}: cannot load the generator ({type(err).__name__}); the file is damaged or "
                        f"does not match {epoch_dir.parent / 'config.json'}") from None
    return generator.to(device).eval()


def soc_model_path(config: dict, run_dir: Path) -> Path:
    """The run's SOC model: as recorded, or relative to the project (runs moved between machines)."""
    recorded = Path(config["soc_model"])
    for p in (recorded, run_dir / recorded, PROJECT_DIR / recorded,
              PROJECT_DIR / "soc_models" / recorded.name):
        if p.is_file():
            return p
    raise UserError(f"{recorded}: the run's SOC estimator model is missing; restore it (config.json "
                    f"'soc_model') to label the synthetic sequences")


def load_soc(config: dict, run_dir: Path, device: torch.device):
    return SOCEstimator.load(soc_model_path(config, run_dir), device, backend="torch")


def steps_kept(seq_len: int, window: int, steps: str) -> tuple[int, int]:
    """(first step, number of steps) of each generated sequence that go out. 'paper': the trainer's
    fake_data.npy (L = min(window, T - window), steps T-L-1..T-2, as the original); 'labelled': every step the
    estimator can read (window-1..T-1); 'all': every step 0..T-1 (fused labels only: they label every step)."""
    if steps == "all":
        return 0, seq_len
    if steps == "labelled":
        return window - 1, seq_len - window + 1
    length = min(window, seq_len - window)
    return seq_len - 1 - length, length


def real_steps(real: np.ndarray, seq_len: int, window: int, segment: str) -> np.ndarray:
    """The real windows' steps that match the synthetic data ('aligned'), or 'paper': steps 0..L-1 (the
    original compared those against synthetic steps T-L-1..T-2)."""
    first, length = steps_kept(seq_len, window, "paper")
    first = 0 if segment == "paper" else first
    return real[:, first:first + length]


# ----------------------------------------------------------------------------------------------------------------
# SOC labels: the estimator's (the paper's) or fused (the estimator's level plus charge counting)

LABELS = ("estimator", "fused")
SPREAD_DEFINITION = ("fused labels: per sequence, the root mean square of the estimator readings' levels "
                     "(reading_k - the charge counted to its step) about the level the labels take (their median), in "
                     "SOC units (0..1): how far the estimator disagrees with the charge count; real windows: median "
                     "0.0053, 99th percentile 0.0216 (docs/experiments/2026-12-08-fused-labels.md)")
# --max-coulomb-error PCT: what it bounds (in SOC %) for each kind of labels
CRITERIA = {"estimator": "the labels' mean |SOC_t - SOC_0 - charge counted| (metrics.coulomb_gap)",
            "fused": "the fused labels' spread x 100 (soc_spread; their coulomb gap is 0 by construction)"}


class Labelled(NamedTuple):
    """Labelled synthetic sequences: x [n, L, 4] scaled V, I, T + SOC of the kept steps, the first generated step
    kept, and with fused labels each sequence's spread [n] (SOC units; None with the estimator's labels)."""
    x: np.ndarray
    first: int
    spread: np.ndarray | None = None


def check_labels(labels: str, scaler: dict | None, source) -> None:
    """Fused labels count charge: they need the scaler with the cell capacity (capacity_ah). Raises a one-line
    UserError naming source (e.g. the run's config.json)."""
    if labels not in LABELS:
        raise UserError(f"--soc-labels {labels}: unknown; use one of {', '.join(LABELS)}")
    if labels == "fused" and not (scaler or {}).get("capacity_ah"):
        raise UserError(f"{source}: --soc-labels fused counts charge with the cell capacity, which neither the run's "
                        f"scaler nor its data sidecar records; rebuild the data with python lg_dataset.py, or use "
                        f"--soc-labels estimator")
    if labels == "fused":
        check_scaler(scaler, source)


def fused_settings(seq_len: int, window: int) -> dict:
    """What the fused labels of sequences of seq_len steps are made of, for a sidecar."""
    return {"readings": FUSED_READINGS, "reading_steps": reading_steps(seq_len, window, FUSED_READINGS).tolist(),
            "reading_window": window, "combination": "median over the readings of (reading - charge counted to its "
            "step); label_t = that level + the charge counted to step t (dt 0.1 s, Q: capacity_ah of the "
            "temperature class nearest the sequence's mean temperature)", "spread": SPREAD_DEFINITION}


def labels_record(labels: str, seq_len: int, window: int) -> dict:
    """What a sample's sidecar says of its SOC labels: which ones, and what fused labels are made of."""
    return {"soc_labels": labels, "soc_fused": fused_settings(seq_len, window) if labels == "fused" else None}


def acceptance_figure(sample: Labelled, labels: str, scaler: dict) -> np.ndarray:
    """[n] what --max-coulomb-error bounds (CRITERIA), in SOC % (NaN for a diverged sequence: never kept)."""
    return sample.spread * 100.0 if labels == "fused" else coulomb_gap(sample.x, scaler)


# ----------------------------------------------------------------------------------------------------------------
# generation and labelling

@torch.no_grad()
def generate(generator: torch.nn.Module, n: int, seed: int, batch_size: int, device: torch.device,
             classes: np.ndarray | None = None) -> np.ndarray:
    """n sequences [n, T, 3] of scaled V, I, T. The noise is drawn on the CPU from `seed`, so a seed gives the same
    noise on any device; z ~ N(0, 1) [n, T, input_dim] as in training. A conditional generator takes each
    sequence's class (int [n]; default: the classes in the proportions of its training windows)."""
    rng = torch.Generator().manual_seed(seed)
    n_classes = getattr(generator, "n_classes", 0)
    if n_classes and classes is None:
        raise ValueError("a conditional generator needs the class of every sequence")
    out = np.empty((n, generator.seq_len, generator.output_dim), np.float32)
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        z = torch.randn(size, generator.seq_len, generator.input_dim, generator=rng)
        part = torch.as_tensor(classes[start:start + size]) if n_classes else None
        z = with_class_channels(z, part, n_classes)
        out[start:start + size] = generator(z.to(device)).float().cpu().numpy()
    return out


def label(soc, sequences: np.ndarray, window: int, first: int, length: int, progress: bool = False,
          labels: str = "estimator", scaler: dict | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """V, I, T of steps first..first+length-1 plus their SOC -> (x [n, length, 4], spread [n] or None).
    labels 'estimator' (the paper's): the estimator's SOC of the window ending at each step (steps from window-1
    on); 'fused': soc.fused_labels (every step; needs the scaler with capacity_ah), with each sequence's spread.
    A sequence with NaN/inf (a diverged generator) gets a NaN SOC (and spread) instead of stopping the labelling."""
    if labels not in LABELS:
        raise ValueError(f"labels {labels!r}: one of {LABELS}")
    if labels == "estimator" and first < window - 1:
        raise ValueError(f"step {first}: the estimator labels steps {window - 1}.. only (fused labels: every step)")
    # ~3 MB of activations per 300-step window: CPU batches stay small. The estimator's labels read 301 windows of
    # 300 steps per sequence (the slow part on a CPU), so they go 16 sequences at a time under a progress bar;
    # fused labels read 4 per sequence, so a chunk holds as many windows from 16 times more sequences
    batch, per_chunk = (2048, 256) if soc.device.type == "cuda" else (256, 16)
    per_chunk *= 16 if labels == "fused" else 1
    out = np.full((len(sequences), length, 4), np.nan, np.float32)
    out[..., :3] = sequences[:, first:first + length]
    spread = np.full(len(sequences), np.nan, np.float32) if labels == "fused" else None
    finite = np.flatnonzero(np.isfinite(sequences).all(axis=(1, 2)))
    with tqdm(total=len(finite), desc="SOC labelling", unit="seq", disable=not progress) as bar:
        for start in range(0, len(finite), per_chunk):   # bounded memory whatever n
            rows = finite[start:start + per_chunk]
            if labels == "fused":   # column t: step t
                socs, spread[rows] = soc.fused_labels(sequences[rows], scaler, window, batch_size=batch)
                out[rows, :, 3] = socs[:, first:first + length]
            else:   # column k: the window ending at step window-1+k
                socs = soc.label(sequences[rows], window=window, batch_size=batch)
                out[rows, :, 3] = socs[:, first - (window - 1):first - (window - 1) + length]
            bar.update(len(rows))
    return out, spread


def labelled_sequences(generator: torch.nn.Module, soc, n: int, seed: int, window: int, batch_size: int,
                       device: torch.device, steps: str = "paper", progress: bool = False,
                       classes: np.ndarray | None = None, labels: str = "estimator",
                       scaler: dict | None = None) -> Labelled:
    """n generated sequences labelled (labels: 'estimator' or 'fused', see label), the kept steps only. The
    trainer's epoch snapshot, generate.py and evaluate.py all use this."""
    first, length = steps_kept(generator.seq_len, window, steps)
    fake = generate(generator, n, seed, batch_size, device, classes)
    x, spread = label(soc, fake, window, first, length, progress, labels, scaler)
    return Labelled(x, first, spread)


def synthesize(run_dir: Path, config: dict, epoch_dir: Path, n: int, seed: int, device: torch.device,
               batch_size: int = 256, steps: str = "paper", progress: bool = False,
               classes: np.ndarray | None = None, labels: str = "estimator") -> Labelled:
    """Labelled synthetic sequences of a saved epoch (scaled V, I, T + SOC of the kept steps). A conditional run's
    sequences get `classes` (default: its training windows' class shares). Fused labels take the run's scaler."""
    scaler = run_scaler(config)
    check_labels(labels, scaler, run_dir / "config.json")
    generator = load_generator(config, epoch_dir, device)
    soc = load_soc(config, run_dir, device)
    if generator.n_classes and classes is None:
        classes = class_counts(config["condition_shares"], n)
    return labelled_sequences(generator, soc, n, seed, config["args"]["soc_estimator_step"], batch_size, device,
                              steps, progress, classes, labels, scaler)


MAX_DRAW_ROUNDS = 20   # --max-coulomb-error: give up after this many rounds of drawing


def synthesize_checked(run_dir: Path, config: dict, epoch_dir: Path, args: argparse.Namespace, seed: int,
                       device: torch.device, scaler: dict | None, classes: np.ndarray | None
                       ) -> tuple[Labelled, np.ndarray | None, int, int]:
    """-n sequences (scaled; --steps, --soc-labels), and with --max-coulomb-error only those within the tolerance
    (CRITERIA: the coulomb gap of the estimator's labels, the spread of fused ones), drawn in rounds (each round its
    own seed) until n are kept -> (the sample, its classes, drawn, within tolerance)."""
    kept, masks, drawn = [], [], 0
    for round_ in range(MAX_DRAW_ROUNDS):
        sample = synthesize(run_dir, config, epoch_dir, args.n_sequences, seed + round_, device, args.batch_size,
                            args.steps, progress=True, classes=classes, labels=args.soc_labels)
        drawn += len(sample.x)
        if args.max_coulomb_error is None:
            return sample, classes, drawn, drawn
        masks.append(acceptance_figure(sample, args.soc_labels, scaler) <= args.max_coulomb_error)
        kept.append(sample)
        if sum(int(m.sum()) for m in masks) >= args.n_sequences:
            break
    passed = sum(int(m.sum()) for m in masks)
    x = np.concatenate([s.x[m] for s, m in zip(kept, masks)])[:args.n_sequences]
    spread = None if args.soc_labels != "fused" else \
        np.concatenate([s.spread[m] for s, m in zip(kept, masks)])[:args.n_sequences]
    if classes is not None:   # every round draws the same classes: keep those of the kept sequences
        classes = np.concatenate([classes[ok] for ok in masks])[:args.n_sequences]
    if len(x) < args.n_sequences:
        raise UserError(f"{epoch_dir}: only {len(x)} of {drawn} sequences are within {args.max_coulomb_error} % SOC "
                        f"by {CRITERIA[args.soc_labels]}; raise --max-coulomb-error or use a better-trained epoch")
    return Labelled(x, kept[0].first, spread), classes, drawn, passed


# ----------------------------------------------------------------------------------------------------------------
# classes and units

def class_counts(shares: list[float], n: int) -> np.ndarray:
    """n class indices in the given shares (largest remainders), grouped by class: [0, 0, ..., 1, ..., 2]."""
    exact = np.asarray(shares, np.float64) / np.sum(shares) * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact)[:n - counts.sum()]] += 1
    return np.repeat(np.arange(len(shares)), counts)


def temperature_shares(spec: str, names: list[str]) -> list[float]:
    """--temperature '25' or '0:0.2,10:0.3,25:0.5' -> a share per class name ('0degC', ...)."""
    temps = [float(name.removesuffix("degC")) for name in names]
    shares = [0.0] * len(names)
    for part in spec.split(","):
        temp, _, share = part.partition(":")
        try:
            k, value = temps.index(float(temp)), float(share or 1)
        except ValueError:
            raise UserError(f"--temperature {spec}: {part!r} is not one of the run's classes "
                            f"{', '.join(f'{t:g}' for t in temps)} (degC), optionally as T:share") from None
        if not value >= 0:
            raise UserError(f"--temperature {spec}: share {share} must be >= 0")
        shares[k] += value
    if sum(shares) <= 0:
        raise UserError(f"--temperature {spec}: the shares add up to 0")
    return shares


def to_physical(x: np.ndarray, scaler: dict) -> np.ndarray:
    return unscale(x, scaler).astype(np.float32)


def run_scaler(config: dict) -> dict | None:
    """The run's scaler; a run made before the data sidecar recorded the cell capacity gets it from that sidecar
    when the two scalers agree (same min and max)."""
    scaler = config.get("scaler")
    if scaler is None or scaler.get("capacity_ah") or not config.get("data_path"):
        return scaler
    try:
        data_scaler = (load_sidecar(config["data_path"]) or {}).get("scaler") or {}
    except (DataError, OSError):   # an unreadable sidecar only means no capacity: the rest works without it
        return scaler
    same = data_scaler.get("min") == scaler.get("min") and data_scaler.get("max") == scaler.get("max")
    return scaler | {"capacity_ah": data_scaler["capacity_ah"]} if same and data_scaler.get("capacity_ah") else scaler


def long_table(x: np.ndarray, columns: tuple[str, ...], spread: np.ndarray | None = None) -> pd.DataFrame:
    """[n, L, 4] -> one row per (sequence, step) with a 10 Hz time column; with fused labels' spread [n], a
    soc_spread column (each sequence's value on its rows)."""
    n, length, _ = x.shape
    step = np.tile(np.arange(length), n)
    table = {"sequence": np.repeat(np.arange(n), length), "step": step, "time_s": step / HZ}
    table.update({c: x[..., i].reshape(-1) for i, c in enumerate(columns)})
    if spread is not None:
        table["soc_spread"] = np.repeat(spread, length)
    return pd.DataFrame(table)
