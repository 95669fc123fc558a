"""Synthetic LG 18650HG2 operation data from a trained run: voltage, current and temperature from the saved
generator, SOC from the run's SOC estimator, converted to physical units with the run's scaler.

    python generate.py -r 1700000000_lstm_gan -n 1000 -o synthetic.parquet         # the latest saved epoch
    python generate.py -r 1700000000_lstm_gan --epoch 2000 -n 64 -o out.csv --seed 1

csv / parquet: long format, one row per step: sequence, step, time_s (10 Hz), voltage_V, current_A,
temperature_C, soc (0..1). npy: float32 [n, L, 4] (V, I, T, SOC). With --scaled, V, I, T stay min-max scaled
(columns voltage_scaled, current_scaled, temperature_scaled). Next to the output, <output>.json records the run,
epoch, seed, steps, units and scaler. The steps are those of the run's own fake_data.npy (the paper's: L =
min(socs, T - socs) steps T-L-1..T-2 of each generated sequence); --steps labelled keeps every step that has an
SOC label (window-1..T-1). Runs on CPU or CUDA with torch only (no TensorFlow).
"""
import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

PROJECT_DIR = Path(__file__).resolve().parent
HZ = 10                      # the LG drive cycles are logged at 10 Hz
FORMATS = (".npy", ".csv", ".parquet")
COLUMNS = ("voltage_V", "current_A", "temperature_C", "soc")
SCALED_COLUMNS = ("voltage_scaled", "current_scaled", "temperature_scaled", "soc")


class GenerateError(ValueError):
    """Bad input: printed as one line `error: ...`, exit code 2, nothing written."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors as one line too (it prints the usage block by default)."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"error: {message} (see python {self.prog} -h)\n")
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# the run folder

def epoch_dirs(run_dir: Path) -> dict[int, Path]:
    """{epoch: folder} of the saved epochs (<N>_epoch/ holding generator.pth), in epoch order."""
    found = {}
    for p in run_dir.glob("*_epoch"):
        head = p.name[:-len("_epoch")]
        if head.isdigit() and (p / "generator.pth").is_file():
            found[int(head)] = p
    return dict(sorted(found.items()))


def open_run(results_dir: str | Path, name: str, epoch: int | None) -> tuple[Path, dict, int, Path]:
    """(run folder, config.json, epoch, epoch folder); the latest saved epoch when epoch is None."""
    run_dir = Path(results_dir) / name
    if not run_dir.is_dir():
        raise GenerateError(f"{run_dir}: no such run; list {results_dir} for run names or pass --results-dir")
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise GenerateError(f"{run_dir / 'config.json'}: missing or unreadable; is {run_dir} a run folder "
                            f"written by train_lstm_gan.py?") from None
    epochs = epoch_dirs(run_dir)
    if not epochs:
        raise GenerateError(f"{run_dir}: no saved epoch (<N>_epoch/generator.pth) yet; train until the first "
                            f"-s interval")
    if epoch is None:
        epoch = max(epochs)
    if epoch not in epochs:
        raise GenerateError(f"{run_dir}: epoch {epoch} was not saved; saved epochs: "
                            f"{', '.join(map(str, epochs))}")
    return run_dir, config, epoch, epochs[epoch]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenerateError(f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def load_generator(config: dict, epoch_dir: Path, device: torch.device) -> torch.nn.Module:
    from train_lstm_gan import Generator
    a = config["args"]
    generator = Generator(a["generator_input_dim"], 3, config["seq_len"], a.get("generator_dropout", 0.0),
                          a.get("model_scale", 1.0), a.get("norm_layout", "paper"))
    path = epoch_dir / "generator.pth"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # older checkpoints (the original's DataParallel) carry a 'module.' prefix
        generator.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    except Exception as err:   # unpickling and shape mismatches: the file does not fit this run's config
        raise GenerateError(f"{path}: cannot load the generator ({type(err).__name__}); the file is damaged or "
                            f"does not match {epoch_dir.parent / 'config.json'}") from None
    return generator.to(device).eval()


def soc_model_path(config: dict, run_dir: Path) -> Path:
    """The run's SOC model: as recorded, or relative to the project (runs moved between machines)."""
    recorded = Path(config["soc_model"])
    for p in (recorded, run_dir / recorded, PROJECT_DIR / recorded,
              PROJECT_DIR / "soc_models" / recorded.name):
        if p.is_file():
            return p
    raise GenerateError(f"{recorded}: the run's SOC estimator model is missing; restore it (config.json "
                        f"'soc_model') to label the synthetic sequences")


def load_soc(config: dict, run_dir: Path, device: torch.device):
    from soc_estimator import SOCEstimator, SOCModelError
    try:
        return SOCEstimator.load(soc_model_path(config, run_dir), device, backend="torch")
    except SOCModelError as err:
        raise GenerateError(str(err)) from None


def steps_kept(seq_len: int, window: int, steps: str) -> tuple[int, int]:
    """(first step, number of steps) of each generated sequence that go out. 'paper': the trainer's
    fake_data.npy (L = min(window, T - window), steps T-L-1..T-2); 'labelled': every step with an SOC label."""
    if steps == "labelled":
        return window - 1, seq_len - window + 1
    length = min(window, seq_len - window)
    return seq_len - 1 - length, length


# ----------------------------------------------------------------------------------------------------------------
# generation

@torch.no_grad()
def generate(generator: torch.nn.Module, n: int, seed: int, batch_size: int, device: torch.device) -> np.ndarray:
    """n sequences [n, T, 3] of scaled V, I, T. The noise is drawn on the CPU from `seed`, so a seed gives the same
    noise on any device; z ~ N(0, 1) [n, T, input_dim] as in training."""
    rng = torch.Generator().manual_seed(seed)
    out = np.empty((n, generator.seq_len, generator.output_dim), np.float32)
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        z = torch.randn(size, generator.seq_len, generator.input_dim, generator=rng)
        out[start:start + size] = generator(z.to(device)).float().cpu().numpy()
    return out


def label(soc, sequences: np.ndarray, window: int, first: int, length: int) -> np.ndarray:
    """V, I, T of steps first..first+length-1 plus the estimator's SOC of the window ending at each step."""
    out = np.empty((len(sequences), length, 4), np.float32)
    for start in range(0, len(sequences), 256):   # bounded memory whatever n
        chunk = sequences[start:start + 256]
        socs = soc.label(chunk, window=window)     # column k: the window ending at step window-1+k
        out[start:start + len(chunk), :, :3] = chunk[:, first:first + length]
        out[start:start + len(chunk), :, 3] = socs[:, first - (window - 1):first - (window - 1) + length]
    return out


def synthesize(run_dir: Path, config: dict, epoch_dir: Path, n: int, seed: int, device: torch.device,
               batch_size: int = 256, steps: str = "paper") -> tuple[np.ndarray, int]:
    """Labelled synthetic sequences [n, L, 4] (scaled V, I, T + SOC) and the first generated step they start at."""
    generator = load_generator(config, epoch_dir, device)
    soc = load_soc(config, run_dir, device)
    window = config["args"]["soc_estimator_step"]
    first, length = steps_kept(config["seq_len"], window, steps)
    return label(soc, generate(generator, n, seed, batch_size, device), window, first, length), first


def to_physical(x: np.ndarray, scaler: dict) -> np.ndarray:
    from lg_dataset import unscale
    return unscale(x, scaler).astype(np.float32)


def long_table(x: np.ndarray, columns: tuple[str, ...]) -> pd.DataFrame:
    """[n, L, 4] -> one row per (sequence, step) with a 10 Hz time column."""
    n, length, _ = x.shape
    step = np.tile(np.arange(length), n)
    table = {"sequence": np.repeat(np.arange(n), length), "step": step, "time_s": step / HZ}
    table.update({c: x[..., i].reshape(-1) for i, c in enumerate(columns)})
    return pd.DataFrame(table)


# ----------------------------------------------------------------------------------------------------------------
# output

def check_output(path: Path) -> None:
    if path.suffix.lower() not in FORMATS:
        raise GenerateError(f"{path}: unknown output format {path.suffix or '(none)'}; use one of "
                            f"{', '.join(FORMATS)}")
    if not path.parent.is_dir():
        raise GenerateError(f"{path.parent}: output folder does not exist; create it first")
    if path.is_dir():
        raise GenerateError(f"{path}: is a folder; give a file name")


def write_atomic(x: np.ndarray, path: Path, columns: tuple[str, ...], meta: dict) -> None:
    """Write to hidden temporary files in the output folder, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_meta = path.with_name(f".{path.name}.json.{os.getpid()}.tmp")
    try:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, x)
        elif suffix == ".csv":
            long_table(x, columns).to_csv(tmp, index=False)
        else:
            long_table(x, columns).to_parquet(tmp, index=False, engine="pyarrow")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, path)
        os.replace(tmp_meta, path.with_name(path.name + ".json"))
    finally:
        for p in (tmp, tmp_meta):
            p.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-r", "--result-name", required=True, help="run folder name under --results-dir")
    p.add_argument("--results-dir", default="./results", help="folder that holds the run folders")
    p.add_argument("--epoch", type=int, default=None, help="saved epoch to use (default: the latest)")
    p.add_argument("-n", "--n-sequences", type=int, default=1000, help="number of sequences to generate")
    p.add_argument("-o", "--output", required=True, help="output file: .npy, .csv or .parquet")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: drawn at random and recorded)")
    p.add_argument("--scaled", action="store_true", help="keep V, I, T min-max scaled instead of V, A, degC")
    p.add_argument("--steps", choices=["paper", "labelled"], default="paper",
                   help="paper: the steps of the run's fake_data.npy; labelled: every step with an SOC label")
    p.add_argument("--batch-size", type=int, default=256, help="sequences per generator batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p


def run(args: argparse.Namespace) -> Path:
    # every check before any work: bad input writes nothing
    out = Path(args.output)
    check_output(out)
    if args.n_sequences < 1 or args.batch_size < 1:
        raise GenerateError(f"-n {args.n_sequences} / --batch-size {args.batch_size}: must be positive")
    device = resolve_device(args.device)
    run_dir, config, epoch, epoch_dir = open_run(args.results_dir, args.result_name, args.epoch)
    scaler = config.get("scaler")
    if scaler is None and not args.scaled:
        raise GenerateError(f"{run_dir / 'config.json'}: the run has no scaler (its data file had no .json "
                            f"sidecar), so physical units are unknown; pass --scaled")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
    x, first = synthesize(run_dir, config, epoch_dir, args.n_sequences, seed, device, args.batch_size, args.steps)
    columns = SCALED_COLUMNS if args.scaled else COLUMNS
    if not args.scaled:
        x = to_physical(x, scaler)
    meta = {"run": run_dir.name, "epoch": epoch, "seed": seed, "n_sequences": args.n_sequences,
            "steps": int(x.shape[1]), "first_generated_step": first, "generated_seq_len": config["seq_len"],
            "hz": HZ, "columns": list(columns), "npy_layout": "[sequence, step, (V, I, T, SOC)]",
            "scaled": args.scaled, "scaler": scaler, "soc": "SOC estimator " + str(config.get("soc_model")),
            "device": str(device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(x, out, columns, meta)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except GenerateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.n_sequences} sequences to {out} (metadata: {out.name}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
