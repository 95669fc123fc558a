"""Quality metrics and plots for a saved epoch of a GAN run.

    python evaluate.py -r 1700000000_lstm_gan                 # the latest saved epoch, every metric
    python evaluate.py -r 1700000000_lstm_gan --epoch all --quick
    python evaluate.py -r 1700000000_lstm_gan --epoch 20 --n-samples 200 --epochs 5 --tstr-hidden 32   # CPU
    python evaluate.py -r 1700000000_lstm_gan --curve        # learning curve of the whole run -> curve.png
    python evaluate.py -r 1700000000_lstm_gan --generate 1000 --soc-labels fused   # realism at 1000 per side
    python evaluate.py -r 1700000000_lstm_gan --downstream [--soc-labels fused] [--downstream-budget paper]

Writes into <run>/<N>_epoch/:
    metrics.json            flat {name: number} (merged into an existing file: the trainer's quick metrics)
    metrics_repeats.json    with --repeats N: each metric at seeds --seed .. --seed+N-1, mean and standard deviation
    metrics_settings.json   seed, sample sizes, the SOC labels the scored sample carries (soc_labels: estimator or
                            fused), training budgets, data files, fixed limits, what each key means
    realism.json            (not with --quick) the realism scores in full: each classifier's accuracy, its
                            real-vs-real floor, the features that tell most, the sample size and its flags
    pca.png, tsne.png       the paper's PCA and t-SNE of the per-step feature means, real vs synthetic
    sequences.png, marginals.png, acf.png   example sequences, value histograms, autocorrelation, physical units
    downstream.json, downstream.png   only with --downstream, which writes nothing else (below)

The synthetic data are the epoch's fake_data.npy (labelled by the trainer; fake_data.npy.json says how), or
--generate N fresh ones, labelled by --soc-labels (estimator, the paper's, or fused), over the same steps. The real
reference is the run's training data (or --real) over the same steps as the synthetic data; PCA/t-SNE compare the
same steps too unless --pca-segment paper (the original: real steps 0..L-1 vs synthetic steps T-L-1..T-2).
The TSTR/TRTR SOC task tests on --test (the real test cycles). Same --seed, same numbers on CPU.
Every metric but --quick's includes the realism scores (realism.py): gradient-boosted trees on per-window summary
features and a GRU classifier (--realism-hidden 64, early stopping within --realism-epochs 30), each against its
real-vs-real floor, on min(synthetic sequences, real windows / 2, 1000) per side: 1000 needs --generate 1000 or a
fake_data.npy that large (generate them with --soc-labels fused: the same V, I, T for the same --seed, labelled
in seconds instead of 40 minutes; the scores read only V, I, T). A smaller sample is scored and flagged
(small_sample; under 100 watch_only), and every post-hoc score is printed with its sample size, "for watching
only" under 100 (TimeGAN's discriminative, predictive and the quick TSTR scores too: the trainer's snapshots hold
a few dozen sequences). The realism scores take 5-15 minutes at 1000 per side on one CPU thread.
--downstream (nothing else is computed): SOC estimators trained on N real windows with their true SOC (TRTR), on
the same windows labelled by the labeller of the synthetic data (label_source: the estimator's reading of each
window, or with --soc-labels fused the fused labels of the 600-step sequences the windows are cut from), on N
synthetic windows (TSTR) and on 5 % and 10 % of the real windows alone and with the N synthetic ones, each at
--downstream-budget (small, the default; paper: the paper's schedule) and every --downstream-seeds seed, tested on
every real --test window overall and per temperature (downstream.py). Synthetic windows come from the epoch's
generator (noise --seed; a conditional run's in its training windows' class shares): with fused labels each
600-step sequence gives two 300-step windows (every step is labelled), with the estimator's one, its exported
steps 299..598; downstream.json says which. Every input is checked before the work starts; downstream.json and
downstream.png are written together at the end (about 30-60 minutes on one CPU thread at the defaults).
--curve draws the losses and every metric of the snapshots' metrics.json against the epoch into <run>/curve.png
(numbers in curve.json), each with its real-vs-real floor: two disjoint samples of real windows of the snapshots'
size (-ess), measured as the trainer measures the synthetic ones; and, dotted, the floor of real V, I, T labelled by
the run's SOC estimator (the best a generator can score on the SOC metrics, whose SOC is the estimator's).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")   # files only: no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch

import downstream
import metrics
import realism
from common import (OneLineParser, UserError, atomic_json, atomic_write, cli, int_at_least, resolve_device,
                    staged_writes)
from lg_dataset import data_classes, load_sidecar
from run_dir import RunDir
from sampling import check_labels, class_counts, label, load_soc, real_steps, run_scaler, steps_kept, synthesize

PROJECT_DIR = Path(__file__).resolve().parent
TEST_DATA = "data/lg_test_300_data.npy"
LABELS = ("voltage [V]", "current [A]", "temperature [degC]", "SOC [-]")
N_SHOWN = 4   # example sequences per set in sequences.png


# ----------------------------------------------------------------------------------------------------------------
# inputs

def find_file(path: str | Path, what: str, flag: str) -> Path:
    """As given, else relative to the project (a run's config records paths as the trainer saw them)."""
    for p in (Path(path), PROJECT_DIR / path):
        if p.is_file():
            return p
    raise UserError(f"{path}: {what} not found; pass it with {flag}")


def load_array(path: Path, what: str) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as err:   # any unreadable file
        raise UserError(f"{path}: unreadable {what} ({type(err).__name__}); rebuild it") from None
    if x.ndim != 3 or x.shape[2] < 4:
        raise UserError(f"{path}: {what} must be an [n, steps, >=4] array (V, I, T, SOC), got shape {x.shape}")
    if not np.isfinite(x).all():   # for fake_data.npy: the generator diverged at this epoch
        raise UserError(f"{path}: {what} holds NaN/inf; nothing to plot (the trainer's metrics.json "
                            f"reports nonfinite_share)")
    return x[..., :4].astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# plots (physical units when the run has a scaler)

def physical(x: np.ndarray, scaler: dict | None) -> np.ndarray:
    if scaler is None:
        return x
    lo, hi = np.asarray(scaler["min"]), np.asarray(scaler["max"])
    out = x.astype(np.float64)
    out[..., :3] = out[..., :3] * (hi - lo) + lo
    return out


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def plot_embedding(real: np.ndarray, fake: np.ndarray, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(real[:, 0], real[:, 1], s=6, alpha=0.5, c="tab:red", label="real")
    ax.scatter(fake[:, 0], fake[:, 1], s=6, alpha=0.5, c="tab:blue", label="synthetic")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def plot_sequences(real: np.ndarray, fake: np.ndarray, scaler: dict | None, path: Path) -> None:
    t = np.arange(real.shape[1]) / 10   # 10 Hz
    fig, axes = plt.subplots(4, 2, figsize=(10, 9), sharex=True, sharey="row")
    for col, (x, name) in enumerate(((real, "real"), (fake, "synthetic"))):
        x = physical(x[:N_SHOWN], scaler)
        for f in range(4):
            axes[f, col].plot(t, x[..., f].T, lw=0.8)
            axes[f, 0].set_ylabel(LABELS[f] if scaler else LABELS[f].split()[0] + " [scaled]")
        axes[0, col].set_title(name)
        axes[3, col].set_xlabel("time [s]")
    save_figure(fig, path)


def plot_marginals(real: np.ndarray, fake: np.ndarray, scaler: dict | None, path: Path) -> None:
    r, f = physical(real, scaler), physical(fake, scaler)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for i, ax in enumerate(axes):
        bins = np.histogram_bin_edges(np.r_[r[..., i].ravel(), f[..., i].ravel()], bins=50)
        ax.hist(r[..., i].ravel(), bins=bins, density=True, alpha=0.5, color="tab:red", label="real")
        ax.hist(f[..., i].ravel(), bins=bins, density=True, alpha=0.5, color="tab:blue", label="synthetic")
        ax.set_xlabel(LABELS[i] if scaler else LABELS[i].split()[0] + " [scaled]")
    axes[0].legend()
    save_figure(fig, path)


def plot_acf(real: np.ndarray, fake: np.ndarray, path: Path) -> None:
    max_lag = min(metrics.ACF_MAX_LAG, real.shape[1] - 1)
    lags = np.arange(1, max_lag + 1) / 10
    ar, af = metrics.autocorrelation(real, max_lag), metrics.autocorrelation(fake, max_lag)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3), sharey=True)
    for i, ax in enumerate(axes):
        ax.plot(lags, ar[i], c="tab:red", label="real")
        ax.plot(lags, af[i], c="tab:blue", label="synthetic")
        ax.set_title(metrics.FEATURES[i])
        ax.set_xlabel("lag [s]")
    axes[0].set_ylabel("autocorrelation")
    axes[0].legend()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# one epoch

def per_class(real: np.ndarray, config: dict, real_path: Path, fake: np.ndarray, classes: np.ndarray,
              scaler: dict | None, seed: int) -> dict[str, float]:
    """A conditional run's quick metrics per class, '<class>/<metric>': each class's synthetic sequences against
    the real windows of that class (the real data's sidecar says which)."""
    real_classes, names = data_classes(real_path, len(real))
    run_names = config["condition_classes"]   # the run's class numbering (a class the data lacks: -1, no windows)
    to_run = np.array([run_names.index(name) if name in run_names else -1 for name in names])
    return metrics.per_class(real, to_run[real_classes], fake, classes, run_names, scaler, seed, min_real=4)


def by_temperature(real: np.ndarray, real_path: Path, fake: np.ndarray, scaler: dict | None,
                   seed: int) -> dict[str, float]:
    """An unconditional run's sequences split by temperature, '<class>/<metric>' and '<class>/n_fake': each sequence
    goes to the class whose real windows' mean temperature is nearest its own and is scored against that class's
    windows. The like-for-like reference for a conditional run's per-class metrics (split by class, a distribution
    is narrower, so e.g. the flat MMD's kernel is too: per class it is larger than overall for any model)."""
    real_classes, names = data_classes(real_path, len(real))
    fake_classes = metrics.nearest_class(fake, real, real_classes)
    # nearest by construction: every sequence matches its class, so no class match or temperature gap
    values = metrics.per_class(real, real_classes, fake, fake_classes, names, scaler, seed, min_real=4,
                               temperature=False)
    return {**values, **{f"{name}/n_fake": float((fake_classes == k).sum()) for k, name in enumerate(names)}}


def sample_metrics(args: argparse.Namespace, run_dir: Path, config: dict, epoch_dir: Path, real: np.ndarray,
                   real_all: np.ndarray, test: np.ndarray | None, scaler: dict | None, device: torch.device,
                   seed: int) -> tuple[dict[str, float], np.ndarray]:
    """The metrics of one synthetic sample (drawn with seed under --generate) against the real windows."""
    classes = None
    if args.generate:
        if config.get("condition_classes"):   # a conditional run: its training shares, grouped by class
            classes = class_counts(config["condition_shares"], args.generate)
        fake = synthesize(run_dir, config, epoch_dir, args.generate, seed, device, classes=classes,
                          labels=args.soc_labels).x
    else:
        fake = load_array(epoch_dir / "fake_data.npy", "synthetic data")
    scores = None
    if args.quick:
        values = metrics.quick_metrics(real, fake, scaler, seed)
    else:
        values = metrics.all_metrics(real, fake, scaler, seed, device, test_windows=test, train_windows=real_all,
                                     epochs=args.epochs, hidden=args.hidden, max_seq=args.n_samples,
                                     tstr_epochs=args.tstr_epochs, tstr_hidden=args.tstr_hidden,
                                     tstr_batch_size=args.tstr_batch_size, tstr_max_windows=args.tstr_max_windows,
                                     tstr_max_test=args.tstr_max_test)
        scores = realism_scores(args, real, fake, scaler, device, seed)
        values.update(realism.flat(scores) if scores else {})
    if classes is not None:
        values.update(per_class(real, config, args.real_path, fake, classes, scaler, seed))
    elif args.by_temperature:
        values.update(by_temperature(real, args.real_path, fake, scaler, seed))
    return values, fake, scores


def realism_scores(args: argparse.Namespace, real: np.ndarray, fake: np.ndarray, scaler: dict | None,
                   device: torch.device, seed: int) -> dict | None:
    """realism.realism_scores of the sample against every real window over the same steps: gradient-boosted trees
    and a GRU (--realism-hidden, --realism-epochs), each with its real-vs-real floor, min(synthetic sequences,
    real windows / 2, 1000) per side (fewer than 1000: flagged small_sample; under 100: watch_only). None, with
    a printed line, where the sample gives fewer than realism.REFUSE_BELOW per side."""
    try:
        realism.sample_size(len(real), len(fake))
    except UserError as err:
        print(f"realism scores skipped: {' '.join(str(err).split())}", flush=True)
        return None
    return realism.realism_scores(real, fake, seed, scaler, device,
                                  gru_kw={"hidden": args.realism_hidden, "max_epochs": args.realism_epochs})


# the sample size behind each post-hoc score, printed beside it: under WATCH_ONLY_BELOW it is for watching only
SAMPLE_SIZES = {"discriminative_score": ("discriminative_n", "per side"),
                "predictive_mae": ("predictive_n", "training sequences"),
                "tstr_rmse_soc_pct": ("tstr_n_windows", "training windows"),
                "trtr_rmse_soc_pct": ("tstr_n_windows", "training windows"),
                "realism_gbt_score": ("realism_n_per_side", "per side"),
                "realism_gru_score": ("realism_n_per_side", "per side")}


def shown(key: str, text: str, values: dict[str, float]) -> str:
    """key=text, and for a post-hoc score its sample size, with 'for watching only' under 100."""
    size_key, unit = SAMPLE_SIZES.get(key, (None, ""))
    if size_key not in values:
        return f"{key}={text}"
    n = int(values[size_key])
    note = f", fewer than {realism.WATCH_ONLY_BELOW}: for watching only, not a claim" \
        if n < realism.WATCH_ONLY_BELOW else ""
    return f"{key}={text} (n = {n} {unit}{note})"


def repeat_metrics(first: dict[str, float], more: list[dict[str, float]], seeds: list[int]) -> dict:
    """--repeats: every metric's value at each seed, their mean and (n - 1) standard deviation."""
    values = {k: [first[k], *(m[k] for m in more)] for k in first}
    return {"seeds": seeds, "mean": {k: float(np.mean(v)) for k, v in values.items()},
            "sd": {k: float(np.std(v, ddof=1)) for k, v in values.items()}, "values": values}


def evaluate_epoch(args: argparse.Namespace, run_dir: Path, config: dict, epoch: int, epoch_dir: Path,
                   real_all: np.ndarray, test: np.ndarray | None, device: torch.device) -> dict[str, float]:
    started = time.time()
    scaler = run_scaler(config)
    window = config["args"]["soc_estimator_step"]
    real = real_steps(real_all, config["seq_len"], window, "aligned")
    values, fake, scores = sample_metrics(args, run_dir, config, epoch_dir, real, real_all, test, scaler, device,
                                          args.seed)
    length = fake.shape[1]
    labels = args.soc_labels if args.generate else snapshot_labels(epoch_dir)
    # one sample's metrics move with the sample (the flat MMD of one model by up to 2x between seeds): more
    # samples, each drawn and scored as the first with the next seeds, give the spread
    seeds = list(range(args.seed, args.seed + args.repeats))
    more = [sample_metrics(args, run_dir, config, epoch_dir, real, real_all, test, scaler, device, s)[0]
            for s in seeds[1:]]

    # PCA and t-SNE on equal-sized samples, the real one over the steps --pca-segment names
    rng = np.random.default_rng(args.seed)
    n = min(len(fake), len(real_all), args.n_samples)
    fake_s = metrics.subsample(fake, n, rng)
    real_s = metrics.subsample(real_steps(real_all, config["seq_len"], window, args.pca_segment), n, rng)
    emb = metrics.pca_tsne(real_s, fake_s, seed=args.seed)
    segment = "same steps" if args.pca_segment == "aligned" else "paper: real steps 0..L-1"
    plot_embedding(emb["pca_real"], emb["pca_fake"], f"PCA, epoch {epoch} ({segment})", epoch_dir / "pca.png")
    plot_embedding(emb["tsne_real"], emb["tsne_fake"], f"t-SNE, epoch {epoch} ({segment})", epoch_dir / "tsne.png")
    plot_sequences(metrics.subsample(real, N_SHOWN, rng), fake_s, scaler, epoch_dir / "sequences.png")
    plot_marginals(metrics.subsample(real, args.n_samples, rng), fake_s, scaler, epoch_dir / "marginals.png")
    plot_acf(metrics.subsample(real, args.n_samples, rng), fake_s, epoch_dir / "acf.png")

    atomic_json(epoch_dir / "metrics.json", {**read_json(epoch_dir / "metrics.json"), **values})
    if scores is not None:   # the whole result (accuracies, the trees' telling features, the GRU's epochs)
        atomic_json(epoch_dir / "realism.json", {"epoch": epoch, "n_fake": len(fake), "soc_labels": labels, **scores})
        print(f"epoch {epoch}, realism scores:\n  " + realism.describe(scores).replace("\n", "\n  "), flush=True)
    if more:
        repeats = repeat_metrics(values, more, seeds)
        atomic_json(epoch_dir / "metrics_repeats.json", {"n_fake": len(fake), **repeats})
        print(f"epoch {epoch}, mean +- sd over seeds {seeds[0]}..{seeds[-1]}: "
              + ", ".join(shown(k, f"{m:.4g}+-{repeats['sd'][k]:.2g}", repeats["mean"])
                          for k, m in repeats["mean"].items() if not k.split("/")[-1].startswith("real_")),
              flush=True)
    atomic_json(epoch_dir / "metrics_settings.json", {
        "epoch": epoch, "seed": args.seed, "repeats": args.repeats, "device": str(device), "quick": args.quick,
        "fake": f"--generate {args.generate}" if args.generate else str(epoch_dir / "fake_data.npy"),
        "n_fake": len(fake), "soc_labels": labels, "n_real": len(real_all), "steps": length,
        "real_steps": [config["seq_len"] - 1 - length, config["seq_len"] - 2],
        "real_data": str(args.real_path), "test_data": None if test is None else str(args.test_path),
        "n_samples": args.n_samples, "post_hoc_epochs": args.epochs, "post_hoc_hidden": args.hidden,
        "tstr_epochs": args.tstr_epochs, "tstr_hidden": args.tstr_hidden,
        "tstr_batch_size": args.tstr_batch_size, "tstr_max_windows": args.tstr_max_windows,
        "tstr_max_test": args.tstr_max_test, "pca_segment": args.pca_segment, "constants": metrics.settings(),
        "realism": None if scores is None else {"n_per_side": scores["n_per_side"], "protocol_per_side":
                                                realism.MIN_PER_SIDE, "small_sample": scores["small_sample"],
                                                "watch_only": scores["watch_only"], "units": scores["units"],
                                                "gru_hidden": args.realism_hidden,
                                                "gru_max_epochs": args.realism_epochs, "file": "realism.json"},
        "seconds": round(time.time() - started, 2), "docs": {**metrics.METRIC_DOCS, **realism.METRIC_DOCS},
    })
    return values


def snapshot_labels(epoch_dir: Path) -> str:
    """The SOC labels the trainer gave the epoch's fake_data.npy (its sidecar; a snapshot without one was written
    before fused labels existed: the estimator's)."""
    return read_json(epoch_dir / "fake_data.npy.json").get("soc_labels", "estimator")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ----------------------------------------------------------------------------------------------------------------
# downstream: SOC estimators trained on the synthetic data, tested on the real test cycles

def file_index(path: Path, rows: int, flag: str) -> list[dict]:
    """The file_index of a data file's sidecar (lg_dataset.py writes it), covering its `rows` windows."""
    index = (load_sidecar(path) or {}).get("file_index")
    if not index or not all({"file", "temp", "start", "stop"} <= set(it) for it in index):
        raise UserError(f"{path}: its .json sidecar has no file_index (which windows come from which file); pass "
                        f"data written by python lg_dataset.py with {flag}")
    if max(it["stop"] for it in index) != rows:
        raise UserError(f"{path}: its sidecar's file_index covers {max(it['stop'] for it in index)} windows, the "
                        f"file holds {rows}; rebuild the pair with python lg_dataset.py")
    return index


def check_writable(paths: list[Path]) -> None:
    folder = paths[0].parent
    for path in paths:
        if path.is_dir():
            raise UserError(f"{path}: is a folder, where the output file goes; move it away")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{folder}: the output folder is not writable; make it writable (or copy the run to a "
                        f"folder you can write and pass --results-dir)")


def seeds_arg(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds such as 0,1, got {text!r}") from None
    if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 2 different seeds >= 0 (the spread needs two)")
    return seeds


def budget_arg(text: str) -> str:
    if text not in downstream.BUDGETS:
        raise argparse.ArgumentTypeError(f"unknown budget {text!r}; one of {', '.join(downstream.BUDGETS)}")
    return text


def run_downstream(args: argparse.Namespace, run_dir: Path, config: dict, epochs: dict[int, Path],
                   real_all: np.ndarray, device: torch.device) -> list[Path]:
    """--downstream: every input checked first (nothing written on bad input), then the synthetic windows, the
    protocol (downstream.run_protocol) and downstream.json + downstream.png, written together."""
    if args.epoch == "all":
        raise UserError(f"{run_dir}: --downstream trains {2 * (3 + 2 * len(downstream.SHARES))} or more SOC "
                        f"estimators per epoch; name one epoch (--epoch N) or leave --epoch out for the latest")
    given = [flag for flag, on in (("--quick", args.quick), ("--curve", args.curve), ("--generate", args.generate),
                                   ("--repeats", args.repeats > 1), ("--by-temperature", args.by_temperature)) if on]
    if given:
        raise UserError(f"{run_dir}: --downstream draws its own synthetic windows (their number: --downstream-n) "
                        f"and computes no other metric; drop {', '.join(given)}")
    [(epoch, epoch_dir)] = epochs.items()
    window, n = config["args"]["soc_estimator_step"], args.downstream_n
    pool, val, val_files = downstream.training_cycles(real_all, file_index(args.real_path, len(real_all), "--real"),
                                                      window)
    downstream.check_sizes(len(pool.x), n, n)
    test_path = find_file(args.test, "SOC test data", "--test")
    test_all = load_array(test_path, "SOC test data")
    test_index = file_index(test_path, len(test_all), "--test")
    if test_all.shape[1] < window:
        raise UserError(f"{test_path}: test windows of {test_all.shape[1]} steps, shorter than the run's SOC window "
                        f"({window}); pass the real test windows with --test")
    outputs = [epoch_dir / "downstream.json", epoch_dir / "downstream.png"]
    check_writable(outputs)
    soc = load_soc(config, run_dir, device)
    labeller = downstream.labeller_for(args.soc_labels, soc, run_scaler(config), window)

    started = time.time()
    synthetic, record = downstream.synthetic_windows(run_dir, config, epoch_dir, n, args.seed, device,
                                                     args.soc_labels, labeller)
    print(f"{record['windows']} synthetic windows from {record['n_sequences']} sequences, {args.soc_labels} labels "
          f"({time.time() - started:.0f} s)", flush=True)
    settings = {"run": run_dir.name, "epoch": epoch, "soc_labels": args.soc_labels, "synthetic": record,
                "real_data": str(args.real_path), "val_files": val_files, "test_data": str(test_path),
                "test_steps": f"the last {window} of each test window (its label: the true SOC at the last step)",
                "generation_seconds": round(time.time() - started, 1)}
    result = downstream.run_protocol(pool, val, downstream.windows(test_all[:, -window:], window), test_index,
                                     synthetic, labeller, n=n, seeds=args.downstream_seeds,
                                     budget=args.downstream_budget, device=device, settings=settings,
                                     log=lambda line: print(line, flush=True))
    result["wall_seconds"] = round(time.time() - started, 1)
    with staged_writes():   # both files or neither
        atomic_json(outputs[0], result)
        downstream.plot(result, outputs[1])
    for name, c in result["configurations"].items():
        print(f"{name:24s} RMSE {c['mean']['rmse_pct']:.2f} +- {c['sd']['rmse_pct']:.2f} %  MAE "
              f"{c['mean']['mae_pct']:.2f} +- {c['sd']['mae_pct']:.2f} %  ({c['n_real']} real, "
              f"{c['n_synthetic']} synthetic)")
    print(", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items() if k != "targets")
          + f" (targets: TSTR / TRTR <= {downstream.TARGETS['tstr_over_trtr']}, with synthetic / alone <= "
            f"{downstream.TARGETS['augmented_over_real']}); {result['wall_seconds']:.0f} s")
    return outputs


# ----------------------------------------------------------------------------------------------------------------
# command line

def epoch_arg(text: str) -> int | str:
    if text == "all":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an epoch number or 'all', got {text!r}")
    return int(text)


# ----------------------------------------------------------------------------------------------------------------
# learning curve

def curve_floor(real_all: np.ndarray, config: dict, n: int, seed: int, soc=None,
                labels: str = "estimator") -> dict[str, float]:
    """The quick metrics of real against real: disjoint samples of n windows each, over the synthetic steps. With
    an SOC estimator, the second sample's SOC is labelled as the run labels its snapshots (labels: estimator or
    fused) instead of the coulomb count: what a generator whose V, I, T were real would score."""
    window = config["args"]["soc_estimator_step"]
    real = real_steps(real_all, config["seq_len"], window, "aligned")
    n = min(n, len(real) // 2)
    idx = np.random.default_rng(seed).permutation(len(real))
    other = real[idx[n:2 * n]]
    if soc is not None:
        first, length = steps_kept(config["seq_len"], window, "paper")
        other, _ = label(soc, real_all[idx[n:2 * n], :, :3], window, first, length, labels=labels,
                         scaler=run_scaler(config))
    return metrics.quick_metrics(real[idx[:n]], other, run_scaler(config), seed)


def labelled_floor(run_dir: Path, config: dict, real_all: np.ndarray, n: int, seed: int,
                   device: torch.device) -> dict[str, float]:
    """curve_floor with the run's SOC labels (--soc-labels as it trains now), kept in curve.json: labelling n
    windows with the estimator's labels takes a minute on a CPU."""
    cached, labels = read_json(run_dir / "curve.json"), config["args"].get("soc_labels", "estimator")
    if (cached.get("floor_seed"), cached.get("floor_windows"), cached.get("floor_soc_labels", "estimator")) == \
            (seed, min(n, len(real_all) // 2), labels) and cached.get("floor_labelled"):
        return cached["floor_labelled"]
    return curve_floor(real_all, config, n, seed, load_soc(config, run_dir, device), labels)


def loss_columns(run: RunDir) -> dict[str, np.ndarray]:
    """losses.csv (read and checked by RunDir) as one array per column."""
    rows = run.read_losses()
    if len(rows) < 2:
        raise UserError(f"{run.path / 'losses.csv'}: no epoch recorded yet; train first")
    return {name: np.array([float(r[k]) for r in rows[1:]]) for k, name in enumerate(rows[0])}


def plot_curve(run_dir: Path, config: dict, real_all: np.ndarray, seed: int, device: torch.device) -> Path:
    """Losses and snapshot metrics against the epoch, floors dashed (real vs real) and dotted (real V, I, T with
    the estimator's SOC vs real); curve.png and curve.json in the run."""
    losses = loss_columns(RunDir(run_dir))
    # every snapshot's metrics.json, also where a shipped run kept only that of its older snapshots
    found = {int(p.parent.name.split("_")[0]): read_json(p) for p in run_dir.glob("*_epoch/metrics.json")
             if p.parent.name.split("_")[0].isdigit()}
    snapshots = {n: found[n] for n in sorted(found) if found[n]}
    if not snapshots:
        raise UserError(f"{run_dir}: no snapshot with metrics.json yet; train past the first -s epoch")
    keys = sorted({k for m in snapshots.values() for k in m if not k.startswith("real_")})
    n = config["args"]["evaluate_sample_size"]
    floor = curve_floor(real_all, config, n, seed)
    floor_labelled = labelled_floor(run_dir, config, real_all, n, seed, device)
    epochs = sorted(snapshots)
    cols = 4
    rows = -(-(len(keys) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    ax = axes.flat[0]
    for name in ("d_loss", "g_loss"):
        ax.plot(losses["epoch"], losses[name], lw=0.6, label=name)
    body = np.concatenate([losses["d_loss"], losses["g_loss"]])
    low, high = np.nanpercentile(body, [1, 99]) if len(body) > 20 else (np.nanmin(body), np.nanmax(body))
    ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))   # the first epochs' spike aside
    ax.set_title("losses (1st-99th percentile range)", fontsize=9)
    ax.legend(fontsize=7)
    for ax, key in zip(axes.flat[1:], keys):
        ax.plot(epochs, [snapshots[n].get(key, np.nan) for n in epochs], "o-", ms=3, lw=1, label="synthetic")
        if key in floor:
            ax.axhline(floor[key], color="k", ls="--", lw=0.8, label="real vs real")
        if key in floor_labelled and not np.isclose(floor_labelled[key], floor.get(key, np.nan)):
            ax.axhline(floor_labelled[key], color="tab:red", ls=":", lw=1, label="real, estimator's SOC")
        ax.set_title(key, fontsize=9)
    axes.flat[1].legend(fontsize=7)
    for ax in axes.flat[len(keys) + 1:]:
        ax.axis("off")
    for ax in axes.flat[:len(keys) + 1]:
        ax.set_xlim(0, max(losses["epoch"][-1], epochs[-1]))
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.suptitle(f"{run_dir.name}: learning curve", fontsize=10)
    fig.tight_layout()
    out = run_dir / "curve.png"
    save_figure(fig, out)
    atomic_json(run_dir / "curve.json", {"epochs": epochs, "metrics": {k: [snapshots[n].get(k) for n in epochs]
                                                                      for k in keys},
                                        "floor": floor, "floor_labelled": floor_labelled, "floor_seed": seed,
                                        "floor_soc_labels": config["args"].get("soc_labels", "estimator"),
                                        "floor_windows": min(config["args"]["evaluate_sample_size"],
                                                             len(real_all) // 2)})
    return out


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-r", "--result-name", required=True, help="run folder name under --results-dir")
    p.add_argument("--results-dir", default="./results", help="folder that holds the run folders")
    p.add_argument("--epoch", type=epoch_arg, default=None, help="saved epoch N, or all (default: the latest)")
    p.add_argument("--real", default=None, help="real windows .npy (default: the run's training data)")
    p.add_argument("--test", default=TEST_DATA, help="real SOC test windows .npy for TSTR/TRTR")
    p.add_argument("--quick", action="store_true", help="only the cheap metrics (no post-hoc model training)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sample and post-hoc model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--repeats", type=int_at_least(1), default=1, metavar="N",
                   help="with --generate: score N fresh samples, seeds --seed .. --seed+N-1; metrics.json holds the "
                        "first, metrics_repeats.json every seed's values, their mean and standard deviation")
    p.add_argument("--generate", type=int_at_least(1), default=None, metavar="N",
                   help="evaluate N freshly generated sequences instead of the epoch's fake_data.npy")
    p.add_argument("--soc-labels", choices=["estimator", "fused"], default=None,
                   help="with --generate or --downstream: the fresh sequences' SOC labels: estimator (the paper's, the "
                        "default) or fused (the estimator's level plus charge counting; needs the run's scaler with "
                        "capacity_ah); without either, fake_data.npy carries the trainer's (its sidecar says)")
    p.add_argument("--n-samples", type=int_at_least(4), default=1000,
                   help="sequences per set for the post-hoc models, PCA/t-SNE and plots (at least 4: PCA, t-SNE "
                        "and the unbiased MMD need a few per set)")
    p.add_argument("--epochs", type=int_at_least(1), default=20, help="training epochs of the post-hoc GRUs")
    p.add_argument("--hidden", type=int_at_least(1), default=32, help="hidden size of the post-hoc GRUs")
    p.add_argument("--tstr-epochs", type=int_at_least(1), default=20, help="training epochs of the TSTR/TRTR SOC LSTM")
    p.add_argument("--tstr-hidden", type=int_at_least(1), default=256, help="SOC LSTM width (256 = the paper's)")
    p.add_argument("--tstr-batch-size", type=int_at_least(1), default=128, help="batch size of the TSTR/TRTR SOC LSTM")
    p.add_argument("--tstr-max-windows", type=int_at_least(1), default=4000, help="training windows for TSTR and TRTR")
    p.add_argument("--tstr-max-test", type=int_at_least(1), default=None, help="test windows used (default: all)")
    p.add_argument("--pca-segment", choices=["aligned", "paper"], default="aligned",
                   help="aligned: real and synthetic over the same steps; paper: real steps 0..L-1 vs synthetic "
                        "steps T-L-1..T-2, as the original")
    p.add_argument("--curve", action="store_true",
                   help="only the learning curve: losses and snapshot metrics against epoch -> <run>/curve.png")
    p.add_argument("--realism-hidden", type=int_at_least(1), default=64,
                   help="hidden size of the realism score's GRU classifier (every metric but --quick's; "
                        "realism.json)")
    p.add_argument("--realism-epochs", type=int_at_least(1), default=30,
                   help="most training epochs of the realism score's GRU (early stopping on a validation part)")
    d = p.add_argument_group("downstream (--downstream: SOC estimators trained on synthetic windows, tested on the "
                             "real test cycles -> downstream.json, downstream.png)")
    d.add_argument("--downstream", action="store_true",
                   help="instead of the metrics: TRTR, the label-source reference, TSTR and real + synthetic "
                        "augmentation at a fixed budget and several seeds, RMSE and MAE on every real test window "
                        "overall and per temperature; the labels: --soc-labels (default estimator)")
    d.add_argument("--downstream-n", type=int_at_least(1), default=2000, metavar="N",
                   help="windows per training set: N real, N synthetic (at most the real pool's 3312)")
    d.add_argument("--downstream-budget", type=budget_arg, default="small", metavar="NAME",
                   help="the SOC LSTM's training budget: small (hidden 64, 12 epochs, cosine 1e-3 to 1e-5; the "
                        "default, well under an hour on 2 cores) or paper (the paper's schedule: hidden 256, lr "
                        "1e-5, up to 1000 epochs, patience 50: days on a CPU)")
    d.add_argument("--downstream-seeds", type=seeds_arg, default=(0, 1), metavar="S,S,...",
                   help="training seeds (at least 2): each draws the real and synthetic windows, initialises and "
                        "orders the batches; --seed is the synthetic sequences' noise seed")
    p.add_argument("--by-temperature", action="store_true",
                   help="an unconditional run: also score its sequences per temperature class, each against the "
                        "real class nearest its mean temperature (the reference for a conditional run's classes)")
    return p


def run(args: argparse.Namespace) -> list[Path]:
    # every input is checked before the first file is written
    device, _ = resolve_device(args.device)
    run = RunDir.open(args.results_dir, args.result_name)
    run_dir, config = run.path, run.read_config()
    latest, latest_dir = run.epoch(None if args.epoch == "all" else args.epoch)
    epochs = run.epochs() if args.epoch == "all" else {latest: latest_dir}
    args.real_path = find_file(args.real or config["data_path"], "real data", "--real")
    real_all = load_array(args.real_path, "real data")
    if real_all.shape[1] != config["seq_len"]:
        raise UserError(f"{args.real_path}: windows of {real_all.shape[1]} steps, but the run generates "
                            f"{config['seq_len']}; pass the run's training data with --real")
    if args.by_temperature:
        if config.get("condition_classes"):
            raise UserError(f"{run_dir}: --by-temperature is for an unconditional run; this conditional run's "
                            f"metrics are per class already (evaluate it with --generate N)")
        data_classes(args.real_path, len(real_all))   # refused here, before any file is written, without classes
    if args.soc_labels is not None and not (args.generate or args.downstream):
        raise UserError(f"{run_dir}: --soc-labels {args.soc_labels} labels fresh sequences; add --generate N (the "
                        f"epoch's fake_data.npy carries the labels the trainer gave it) or --downstream")
    args.soc_labels = args.soc_labels or "estimator"
    check_labels(args.soc_labels, run_scaler(config), run_dir / "config.json")
    if args.downstream:
        return run_downstream(args, run_dir, config, epochs, real_all, device)
    if args.repeats > 1 and not args.generate:
        raise UserError(f"{run_dir}: --repeats {args.repeats} scores fresh samples; add --generate N")
    if args.curve:
        out = plot_curve(run_dir, config, real_all, args.seed, device)
        print(f"wrote {out}")
        return [out]
    if not args.generate:
        missing = [d / "fake_data.npy" for d in epochs.values() if not (d / "fake_data.npy").is_file()]
        if missing:
            raise UserError(f"{missing[0]}: missing; the epoch folder is incomplete (evaluate fresh sequences "
                                f"with --generate N)")
    test = None
    if not args.quick:
        args.test_path = find_file(args.test, "SOC test data", "--test")
        test = load_array(args.test_path, "SOC test data")
    done = []
    for n, epoch_dir in epochs.items():
        values = evaluate_epoch(args, run_dir, config, n, epoch_dir, real_all, test, device)
        print(f"epoch {n}: " + ", ".join(shown(k, f"{v:.4g}", values) for k, v in values.items()
                                          if not k.startswith("real_")), flush=True)
        done.append(epoch_dir / "metrics.json")
    return done


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
