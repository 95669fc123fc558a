"""Synthetic LG 18650HG2 operation data from a trained run: voltage, current and temperature from the saved
generator, SOC labels from the run's SOC estimator, converted to physical units with the run's scaler.

    python generate.py -r 1700000000_lstm_gan -n 1000 -o synthetic.parquet         # the latest saved epoch
    python generate.py -r 1700000000_lstm_gan --epoch 2000 -n 64 -o out.csv --seed 1
    python generate.py -r 1700000000_lstm_gan -n 1000 -o fused.parquet --soc-labels fused   # every step labelled

csv / parquet: long format, one row per step: sequence, step, time_s (10 Hz), voltage_V, current_A,
temperature_C, soc (0..1), and with fused labels soc_spread (per sequence). npy: float32 [n, L, 4] (V, I, T, SOC).
With --scaled, V, I, T stay min-max scaled (columns voltage_scaled, current_scaled, temperature_scaled). Next to
the output, <output>.json records the run, epoch, seed, steps, units, scaler and which SOC labels the data carries.
--soc-labels estimator (the paper's, the default): the estimator's reading of the window ending at each step; the
steps are those of the run's own fake_data.npy (L = min(socs, T - socs) steps T-L-1..T-2 of each generated
sequence); --steps labelled keeps every step the estimator reads (window-1..T-1). --soc-labels fused: the level
of 4 estimator readings plus the charge counted from the current at every step (soc_estimator.fused_labels; 75x
cheaper), all T steps by default (--steps all), each sequence's spread in the soc_spread column and the sidecar.
Runs on CPU or CUDA with torch only (no TensorFlow).
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from common import OneLineParser, UserError, atomic_npy, atomic_write, cli, resolve_device
from metrics import coulomb_gap
from run_dir import RunDir
from sampling import (CRITERIA, HZ, SPREAD_DEFINITION, check_labels, class_counts, labels_record, long_table,
                      run_scaler, synthesize_checked, temperature_shares, to_physical)

FORMATS = (".npy", ".csv", ".parquet")
COLUMNS = ("voltage_V", "current_A", "temperature_C", "soc")
SCALED_COLUMNS = ("voltage_scaled", "current_scaled", "temperature_scaled", "soc")


# ----------------------------------------------------------------------------------------------------------------
# output

def check_output(path: Path) -> None:
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"{path}: unknown output format {path.suffix or '(none)'}; use one of "
                            f"{', '.join(FORMATS)}")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: output folder does not exist; create it first")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name")


def write_output(x: np.ndarray, path: Path, columns: tuple[str, ...], meta: dict,
                 spread: np.ndarray | None = None) -> None:
    """The data file (csv / parquet: with fused labels' spread as a column), then its .json metadata, each written
    atomically."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        atomic_npy(path, x)
    elif suffix == ".csv":
        atomic_write(path, lambda tmp: long_table(x, columns, spread).to_csv(tmp, index=False))
    else:
        atomic_write(path, lambda tmp: long_table(x, columns, spread).to_parquet(tmp, index=False, engine="pyarrow"))
    atomic_write(path.with_name(path.name + ".json"), json.dumps(meta, indent=2))


def coulomb_record(x: np.ndarray, scaler: dict | None, args: argparse.Namespace, drawn: int,
                   passed: int) -> dict | None:
    """The sidecar's soc_coulomb: the kept (scaled) sequences' coulomb gap and --max-coulomb-error's acceptance, by
    the criterion of the labels; None without the cell capacity."""
    if not (scaler or {}).get("capacity_ah"):
        return None
    gap = coulomb_gap(x, scaler)
    tolerance = args.max_coulomb_error
    return {"soc_coulomb_error_pct": float(gap.mean()), "max_pct": float(gap.max()), "kept": len(gap),
            "drawn": drawn, "acceptance_rate": passed / drawn, "max_coulomb_error_pct": tolerance,
            "criterion": None if tolerance is None else f"{CRITERIA[args.soc_labels]} <= {tolerance} % SOC"}


def spread_record(spread: np.ndarray | None) -> dict | None:
    """The sidecar's soc_spread: fused labels' spread of every sequence (in order), its definition and summary."""
    if spread is None:
        return None
    return {"definition": SPREAD_DEFINITION, "units": "SOC (0..1)", "median": float(np.median(spread)),
            "max": float(spread.max()), "per_sequence": spread.tolist()}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-r", "--result-name", required=True, help="run folder name under --results-dir")
    p.add_argument("--results-dir", default="./results", help="folder that holds the run folders")
    p.add_argument("--epoch", type=int, default=None, help="saved epoch to use (default: the latest)")
    p.add_argument("-n", "--n-sequences", type=int, default=1000, help="number of sequences to generate")
    p.add_argument("-o", "--output", required=True, help="output file: .npy, .csv or .parquet")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: drawn at random and recorded)")
    p.add_argument("--scaled", action="store_true", help="keep V, I, T min-max scaled instead of V, A, degC")
    p.add_argument("--soc-labels", choices=["estimator", "fused"], default="estimator",
                   help="estimator: the SOC estimator's reading of the window ending at each step (the paper); "
                        "fused: every step, the level of 4 estimator readings plus the charge counted from the "
                        "current (needs the run's scaler with capacity_ah), with each sequence's spread")
    p.add_argument("--steps", choices=["paper", "labelled", "all"], default=None,
                   help="paper: the steps of the run's fake_data.npy (the default with estimator labels); labelled: "
                        "every step the estimator reads (window-1..T-1); all: every generated step (fused labels "
                        "only, their default)")
    p.add_argument("--batch-size", type=int, default=256, help="sequences per generator batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--temperature", default=None, metavar="SPEC",
                   help="conditional runs (--condition temperature): the ambient temperature of the sequences, "
                        "e.g. 25, or a mix '0:0.2,10:0.3,25:0.5' (default: the training windows' shares)")
    p.add_argument("--max-coulomb-error", type=float, default=None, metavar="PCT",
                   help="keep only sequences whose SOC labels stay within PCT %% SOC of charge counting on average "
                        "(metrics.coulomb_gap), with fused labels (0 there by construction) those whose spread x 100 "
                        "is at most PCT (real windows: 99th percentile 2.16), drawing more until n are kept; the "
                        "acceptance rate is reported")
    return p


def run(args: argparse.Namespace) -> Path:
    # every check before any work: bad input writes nothing
    out = Path(args.output)
    check_output(out)
    if args.n_sequences < 1 or args.batch_size < 1:
        raise UserError(f"-n {args.n_sequences} / --batch-size {args.batch_size}: must be positive")
    if args.max_coulomb_error is not None and not args.max_coulomb_error > 0:
        raise UserError(f"--max-coulomb-error {args.max_coulomb_error}: must be a tolerance > 0 in SOC %, e.g. 2")
    fused = args.soc_labels == "fused"
    args.steps = args.steps or ("all" if fused else "paper")
    if args.steps == "all" and not fused:
        raise UserError("--steps all: the estimator labels steps from its window's end on only; use --steps "
                        "labelled, or --soc-labels fused, which labels every step")
    device, _ = resolve_device(args.device)
    run = RunDir.open(args.results_dir, args.result_name)
    run_dir, config = run.path, run.read_config()
    epoch, epoch_dir = run.epoch(args.epoch)
    scaler = run_scaler(config)
    if scaler is None and not args.scaled:
        raise UserError(f"{run_dir / 'config.json'}: the run has no scaler (its data file had no .json "
                            f"sidecar), so physical units are unknown; pass --scaled")
    if args.max_coulomb_error is not None and not (scaler or {}).get("capacity_ah"):
        raise UserError(f"{run_dir / 'config.json'}: --max-coulomb-error needs the cell capacity, which neither the "
                        f"run's scaler nor its data sidecar records; rebuild the data with python lg_dataset.py")
    check_labels(args.soc_labels, scaler, run_dir / "config.json")
    names = config.get("condition_classes") or []
    if args.temperature is not None and not names:
        raise UserError(f"{run_dir / 'config.json'}: --temperature needs a run trained with --condition temperature")
    shares = temperature_shares(args.temperature, names) if args.temperature else config.get("condition_shares")
    classes = class_counts(shares, args.n_sequences) if names else None
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
    sample, classes, drawn, passed = synthesize_checked(run_dir, config, epoch_dir, args, seed, device, scaler,
                                                        classes)
    x, first, spread = sample
    coulomb = coulomb_record(x, scaler, args, drawn, passed)
    columns = SCALED_COLUMNS if args.scaled else COLUMNS
    if not args.scaled:
        x = to_physical(x, scaler)
    estimator = "SOC estimator " + str(config.get("soc_model"))
    table = fused and out.suffix.lower() != ".npy"   # csv / parquet: the spread as a column
    meta = {"run": run_dir.name, "epoch": epoch, "seed": seed, "n_sequences": args.n_sequences,
            "steps": int(x.shape[1]), "steps_kept": args.steps, "first_generated_step": first,
            "generated_seq_len": config["seq_len"], "hz": HZ, "columns": list(columns) + ["soc_spread"] * table,
            "npy_layout": "[sequence, step, (V, I, T, SOC)]", "scaled": args.scaled, "scaler": scaler,
            "soc": f"fused: the level of {estimator}'s readings plus charge counting" if fused else estimator,
            **labels_record(args.soc_labels, config["seq_len"], config["args"]["soc_estimator_step"]),
            "soc_spread": spread_record(spread), "device": str(device),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "soc_coulomb": coulomb,
            "ambient_temperature_per_sequence": None if classes is None else [names[k] for k in classes]}
    write_output(x, out, columns, meta, spread)
    if coulomb is not None and args.max_coulomb_error is not None:
        print(f"kept {coulomb['kept']} of {drawn} sequences within {args.max_coulomb_error} % SOC by "
              f"{CRITERIA[args.soc_labels]} (acceptance {coulomb['acceptance_rate']:.1%})")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run_and_report() -> None:
        out = run(args)
        print(f"wrote {args.n_sequences} sequences to {out} (metadata: {out.name}.json)")
    return cli(run_and_report)


if __name__ == "__main__":
    sys.exit(main())
