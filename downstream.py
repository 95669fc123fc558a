"""What the synthetic data is for: SOC estimators trained on it, alone and beside a little real data, tested on
every real test window. The paper's downstream task, at a fixed and stated budget, over several seeds.

    labeller = estimator_labeller(soc) | fused_labeller(soc, scaler)   the labels of the synthetic data
    pool, val, files = training_cycles(real, file_index)   real 300-step windows of the TRAINING cycles, split by file
    synthetic, record = synthetic_windows(run_dir, config, epoch_dir, n, seed, device, labels, labeller)
    result = run_protocol(pool, val, test, test_index, synthetic, labeller)    every configuration, every seed
    plot(result, path)                                   RMSE per configuration with the seeds' spread

Configurations, each trained from scratch with the same budget (BUDGETS) and the same validation windows:
    trtr                 N real training windows, their true SOC (charge counting)
    label_source         the same windows, SOC from the labeller that labels the synthetic data (the run's SOC
                         estimator's reading of each window, or its fused labels of the 600-step sequences the
                         windows are cut from): what the synthetic data's labels can give at best
    tstr                 N synthetic windows with their labels
    real_<p>pct          p % of N real windows alone (true SOC)
    real_<p>pct+synthetic   the same real windows and the N synthetic ones
A window is [W, 3] scaled V, I, T; its label the SOC at its last step. Sets smaller than N are repeated to at
least N windows per epoch, so every configuration gets as many optimiser steps per epoch. Early stopping watches
a fixed set of real windows from the training cycles (whole files held out, never the test cycles). The seed
draws the real and synthetic windows, initialises the network and orders the batches.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

import sampling
import train_soc_estimator as ts
from common import UserError
from metrics import seeded, soc_windows
from soc_estimator import FUSED_READINGS, SOCLSTM

Windows = tuple[np.ndarray, np.ndarray]          # X float32 [n, W, 3] scaled V, I, T; y float32 [n] SOC at the end
# sequences [m, T, >=3] scaled V, I, T -> the SOC at the last step of each window that windows() cuts from them,
# in its order [m * (T // W)]; a sequence of W steps is one window. It carries a .name for the record.
Labeller = Callable[[np.ndarray], np.ndarray]


class Pool(NamedTuple):
    """The real windows the training sets are drawn from (x [n, W, 3], true SOC y [n]) and the sequences they are
    cut from ([m, T, >=3]: windows(sequences) gives x, y), which the label-source labeller reads."""
    x: np.ndarray
    y: np.ndarray
    sequences: np.ndarray


# "small": a budget the whole protocol (7 sets x 2 seeds) fits in well under an hour on 2 CPU cores (measured in
# docs/experiments/2026-12-08-downstream-and-realism.md); "paper": the paper's estimator schedule (days on a CPU)
# "small": the learning rate falls from 1e-3 to 1e-5 over the epochs (cosine), which settles the noisy validation
# loss of a constant 1e-3 (a small LSTM on 2000 real windows: 3.9 % test RMSE either way, in 12 epochs instead of 20)
BUDGETS = {
    "small": {"hidden": 64, "lr": 1e-3, "lr_decay": "cosine", "min_lr": 1e-5, "batch_size": 64, "epochs": 12,
              "patience": 4},
    "paper": {"hidden": 256, "lr": 1e-5, "lr_decay": "none", "min_lr": 1e-5, "batch_size": 32, "epochs": 1000,
              "patience": 50},
}
SHARES = (0.05, 0.10)
TARGETS = {"tstr_over_trtr": 1.5, "augmented_over_real": 0.9}   # the downstream issue's targets (RMSE ratios)


# ----------------------------------------------------------------------------------------------------------------
# windows

def windows(x: np.ndarray, window: int = 300) -> Windows:
    """[n, T, >=4] scaled V, I, T, SOC -> windows of `window` steps cut from each sequence at stride `window`,
    aligned to its end (metrics.soc_windows), each labelled with the SOC at its last step."""
    w = soc_windows(np.asarray(x)[..., :4], window)
    return np.ascontiguousarray(w[..., :3], np.float32), np.ascontiguousarray(w[:, -1, 3], np.float32)


def pool_of(sequences: np.ndarray, window: int = 300) -> Pool:
    """Real sequences [m, T, >=4] (V, I, T, SOC) -> their windows as a Pool."""
    sequences = np.asarray(sequences)
    return Pool(*windows(sequences, window), sequences)


def training_cycles(real: np.ndarray, file_index: list[dict], window: int = 300,
                    val_files: list[str] | None = None) -> tuple[Pool, Windows, list[str]]:
    """The real training sequences [m, T, 4] (data/lg_600_data.npy, its sidecar's file_index) -> (pool, validation,
    the validation files): windows of the val_files (default: the last file of each temperature) validate, the
    other files' windows are the pool the real training sets are drawn from. Whole files, because neighbouring
    windows of one discharge are nearly alike: held-out windows of the same files would validate on the training
    data."""
    if val_files is None:
        last = {it["temp"]: it["file"] for it in file_index}
        val_files = list(last.values())
    unknown = set(val_files) - {it["file"] for it in file_index}
    if unknown:
        raise UserError(f"validation files {sorted(unknown)} are not in the real data's file_index; "
                        f"name files of the training cycles")
    is_val = np.zeros(len(real), bool)
    for it in file_index:
        is_val[it["start"]:it["stop"]] |= it["file"] in val_files
    if is_val.all() or not is_val.any():
        raise UserError("the validation files must leave some training files for the pool and hold some windows")
    return pool_of(real[~is_val], window), windows(real[is_val], window), list(val_files)


def estimator_labeller(estimator, window: int = 300) -> Labeller:
    """The paper's labels (--soc-labels estimator) as a Labeller: a soc_estimator.SOCEstimator's reading of each
    window, the SOC at its last step (generate.py's label of the window's last step), through sampling.label."""
    def label(x: np.ndarray) -> np.ndarray:
        cut = soc_windows(np.asarray(x, np.float32)[..., :3], window)
        return sampling.label(estimator, cut, window, window - 1, 1)[0][:, 0, 3]
    label.name = f"SOC estimator {Path(estimator.path).name}: its reading of each {window}-step window"
    return label


def fused_labeller(estimator, scaler: dict, window: int = 300) -> Labeller:
    """Fused labels (--soc-labels fused) as a Labeller: sampling.label's fused labels of every step of each whole
    sequence (the level of FUSED_READINGS estimator readings plus the charge counted from the current), then the
    label at each window's last step: a 600-step sequence gives two 300-step windows, labelled as one sequence."""
    def label(x: np.ndarray) -> np.ndarray:
        vit = np.asarray(x, np.float32)[..., :3]
        soc = sampling.label(estimator, vit, window, 0, vit.shape[1], labels="fused", scaler=scaler)[0]
        return soc_windows(soc[..., 3:], window)[:, -1, 0]
    label.name = (f"fused labels of SOC estimator {Path(estimator.path).name} ({FUSED_READINGS} readings per "
                  f"sequence + charge counting), at each {window}-step window's last step")
    return label


def labeller_for(labels: str, estimator, scaler: dict | None, window: int = 300) -> Labeller:
    """The Labeller of --soc-labels `labels` (estimator or fused): the same for the synthetic and the real data."""
    if labels == "fused":
        return fused_labeller(estimator, scaler, window)
    if labels == "estimator":
        return estimator_labeller(estimator, window)
    raise ValueError(f"labels {labels!r}: one of {sampling.LABELS}")


def windows_per_sequence(labels: str, seq_len: int, window: int) -> int:
    """Synthetic windows a generated sequence gives: with fused labels every step is labelled, so T // window
    (2 of 300 steps from 600); with the estimator's labels only the exported steps are: one window, the `window`
    steps ending at the last exported step (T-2: steps 299..598 of 600, those of fake_data.npy)."""
    return seq_len // window if labels == "fused" else 1


def synthetic_windows(run_dir: Path, config: dict, epoch_dir: Path, n: int, seed: int, device: torch.device,
                      labels: str, labeller: Labeller) -> tuple[Windows, dict]:
    """At least n labelled synthetic windows of a saved epoch -> ((X, y), what they are). The generator's
    sequences (noise from `seed`; a conditional run's in its training windows' class shares) cut as
    windows_per_sequence says, each labelled by `labeller` (the one that labels the label-source reference).
    Raises a one-line UserError when a sequence is not finite (a diverged generator)."""
    window, seq_len = config["args"]["soc_estimator_step"], config["seq_len"]
    per = windows_per_sequence(labels, seq_len, window)
    n_seq = math.ceil(n / per)
    generator = sampling.load_generator(config, epoch_dir, device)
    classes = sampling.class_counts(config["condition_shares"], n_seq) if generator.n_classes else None
    fake = sampling.generate(generator, n_seq, seed, 256, device, classes)
    if labels != "fused":   # the exported steps' last `window`: one window, one reading
        fake = fake[:, seq_len - 1 - window:seq_len - 1]
    bad = int((~np.isfinite(fake).all(axis=(1, 2))).sum())
    if bad:
        raise UserError(f"{epoch_dir}: {bad} of {n_seq} generated sequences hold NaN/inf (the generator diverged "
                        f"at this epoch); use another epoch")
    x, y = soc_windows(fake, window), labeller(fake)
    first = seq_len - per * window if labels == "fused" else seq_len - 1 - window
    last = first + per * window - 1
    cut = (f"fused labels label every generated step: steps {first}..{last} of each sequence cut into {per} "
           f"window(s) of {window} steps (stride {window}, aligned to its end), each labelled at its last step"
           if labels == "fused" else
           f"the estimator's labels label only the exported steps: one window per sequence, steps {first}..{last} "
           f"(the last {window} of those fake_data.npy holds), labelled at its last step")
    record = {"soc_labels": labels, "labeller": getattr(labeller, "name", "labeller"), "seed": seed,
              "n_sequences": n_seq, "windows_per_sequence": per, "windows": len(x), "seq_len": seq_len,
              "generated_steps": [first, last], "cut": cut,
              "classes": None if classes is None else
              {name: int((classes == k).sum()) for k, name in enumerate(config["condition_classes"])},
              "soc_quantiles_5_50_95": [float(q) for q in np.percentile(y, [5, 50, 95])]}
    return (np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.float32)), record


# ----------------------------------------------------------------------------------------------------------------
# training sets, one model, the whole protocol

def check_sizes(pool_windows: int, synthetic_windows: int, n: int) -> None:
    """Every set draws N windows of the real pool and of the synthetic data: refused (one line) when either holds
    fewer."""
    if pool_windows < n or synthetic_windows < n:
        raise UserError(f"downstream: N = {n} windows per set, but the real pool holds {pool_windows} and the "
                        f"synthetic data {synthetic_windows}; generate more sequences or lower N")


def training_sets(pool: Pool, pool_labelled: np.ndarray, synthetic: Windows, n: int, shares: tuple[float, ...],
                  rng: np.random.Generator, labeller_name: str = "labeller") -> dict[str, tuple[Windows, dict]]:
    """The configurations' training windows for one seed -> {name: ((X, y), {n_real, n_synthetic, labels})}.
    pool_labelled: the label-source labeller's SOC of every pool window (labeller(pool.sequences))."""
    check_sizes(len(pool.x), len(synthetic[0]), n)
    pick = np.sort(rng.permutation(len(pool.x))[:n])
    real_x, real_y = pool.x[pick], pool.y[pick]
    syn = np.sort(rng.permutation(len(synthetic[0]))[:n])
    syn_x, syn_y = synthetic[0][syn], synthetic[1][syn]
    sets = {"trtr": ((real_x, real_y), {"n_real": n, "n_synthetic": 0, "labels": "true"}),
            "label_source": ((real_x, np.asarray(pool_labelled[pick], np.float32)),
                             {"n_real": n, "n_synthetic": 0, "labels": labeller_name}),
            "tstr": ((syn_x, syn_y), {"n_real": 0, "n_synthetic": n, "labels": "synthetic"})}
    for share in shares:
        k = max(1, round(share * n))
        small = rng.permutation(n)[:k]   # a subset of the same draw: the shares nest in the TRTR set
        name = f"real_{share * 100:g}pct"
        sets[name] = ((real_x[small], real_y[small]), {"n_real": k, "n_synthetic": 0, "labels": "true"})
        sets[name + "+synthetic"] = ((np.concatenate([real_x[small], syn_x]), np.concatenate([real_y[small], syn_y])),
                                     {"n_real": k, "n_synthetic": n, "labels": "true + synthetic"})
    return sets


def repeated(train: Windows, n: int) -> Windows:
    """A set smaller than n repeated whole (ceil(n / size) times): as many optimiser steps per epoch as N windows."""
    reps = math.ceil(n / len(train[0]))
    return (np.concatenate([train[0]] * reps), np.concatenate([train[1]] * reps)) if reps > 1 else train


def train_and_test(train: Windows, val: Windows, test: Windows, test_index: list[dict], budget: dict, seed: int,
                   device: torch.device) -> dict:
    """One SOC LSTM (soc_estimator.SOCLSTM at the budget's width) trained by train_soc_estimator.train (Adam,
    Huber, early stopping on the validation windows, the best epoch's weights), tested on every test window."""
    cfg = {"lr": budget["lr"], "lr_decay": budget.get("lr_decay", "none"), "min_lr": budget.get("min_lr", 0.0),
           "step_every": 1, "gamma": 1.0,
           "epochs": budget["epochs"], "patience": budget["patience"], "batch_size": budget["batch_size"],
           "seed": seed}
    started = time.time()
    with seeded(seed, device), tempfile.TemporaryDirectory(prefix="downstream_") as tmp:
        model = SOCLSTM(n_features=3, hidden=budget["hidden"]).to(device)
        ck = ts.train(model, train[0], train[1], val[0], val[1], cfg, Path(tmp) / "ckpt.pt", device,
                      log=lambda line: None)
        m = ts.metrics(ts.predict(model, test[0], device), test[1], test_index)
    best = ck["history"][ck["best_epoch"] - 1]
    return {"seed": seed, "overall": errors(m["overall"]),
            "per_temp": {t: errors(r) for t, r in m["per_temp"].items()},
            "epochs_run": ck["epoch"], "best_epoch": ck["best_epoch"], "val_rmse_pct": best["val_rmse_pct"],
            "train_windows": len(train[0]), "seconds": round(time.time() - started, 1)}


def errors(r: dict) -> dict:
    return {"rmse_pct": r["rmse_pct"], "mae_pct": r["mae_pct"]}


def run_protocol(pool: Pool, val: Windows, test: Windows, test_index: list[dict], synthetic: Windows,
                 labeller: Labeller, n: int = 2000, shares: tuple[float, ...] = SHARES,
                 seeds: tuple[int, ...] = (0, 1), budget: str | dict = "small", device: torch.device | str = "cpu",
                 settings: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Every configuration at every seed -> the dict for downstream.json: settings, budget, seeds, per
    configuration the runs (RMSE and MAE in SOC % overall and per temperature) with their mean and sd over the
    seeds, the issue's ratios and timing. The labeller labels the pool's sequences once (the label-source
    reference). settings: what the caller wants recorded (run, epoch, data files)."""
    started = time.time()
    device = torch.device(device)
    budget = dict(BUDGETS[budget], name=budget) if isinstance(budget, str) else dict(budget)
    if not all(0 < s <= 1 for s in shares):
        raise UserError(f"downstream: real shares {shares} must lie in (0, 1]")
    check_sizes(len(pool.x), len(synthetic[0]), n)
    labeller_name = getattr(labeller, "name", "labeller")
    t0 = time.time()
    pool_labelled = np.asarray(labeller(pool.sequences), np.float32)
    if pool_labelled.shape != pool.y.shape:
        raise ValueError(f"the labeller gave {pool_labelled.shape} labels for {pool.y.shape} pool windows")
    log(f"the {len(pool.x)} real pool windows labelled: {labeller_name} ({time.time() - t0:.0f} s)")
    configs: dict[str, dict] = {}
    for seed in seeds:
        sets = training_sets(pool, pool_labelled, synthetic, n, shares, np.random.default_rng(seed), labeller_name)
        for name, (train, info) in sets.items():
            run = train_and_test(repeated(train, n), val, test, test_index, budget, seed, device)
            configs.setdefault(name, {**info, "runs": []})["runs"].append(run)
            log(f"seed {seed} {name:24s} RMSE {run['overall']['rmse_pct']:.2f} %  MAE {run['overall']['mae_pct']:.2f} %"
                f"  (best epoch {run['best_epoch']} of {run['epochs_run']}, {run['seconds']:.0f} s)")
    for c in configs.values():
        c.update(summary(c["runs"]))
    return {"settings": {"n_windows": n, "shares": list(shares), "window": int(test[0].shape[1]),
                         "pool_windows": len(pool[0]), "val_windows": len(val[0]), "test_windows": len(test[0]),
                         "synthetic_windows": len(synthetic[0]), "labeller": labeller_name,
                         "label_source_error_pct": label_error(pool_labelled, pool.y),
                         "device": str(device), "threads": torch.get_num_threads(), **(settings or {})},
            "budget": budget, "seeds": list(seeds), "configurations": configs, "ratios": ratios(configs),
            "seconds": round(time.time() - started, 1)}


def label_error(labelled: np.ndarray, true: np.ndarray) -> dict:
    """The labeller's RMSE and MAE against the true SOC over the whole real pool, in SOC %."""
    err = 100 * (labelled.astype(np.float64) - true)
    return {"rmse_pct": float(np.sqrt(np.mean(err ** 2))), "mae_pct": float(np.mean(np.abs(err)))}


def summary(runs: list[dict]) -> dict:
    """Mean and sd (n - 1; 0 for one seed) over the seeds of every RMSE and MAE, overall and per temperature."""
    def stats(values: list[float]) -> tuple[float, float]:
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    mean, sd = {}, {}
    for key in ("rmse_pct", "mae_pct"):
        mean[key], sd[key] = stats([r["overall"][key] for r in runs])
        for t in runs[0]["per_temp"]:
            mean[f"{t}/{key}"], sd[f"{t}/{key}"] = stats([r["per_temp"][t][key] for r in runs])
    return {"mean": mean, "sd": sd}


def ratios(configs: dict) -> dict:
    """The issue's targets as RMSE ratios of the means: TSTR / TRTR (<= 1.5) and each real share with the synthetic
    windows / the same share alone (<= 0.9); label_source / TRTR says what the labels cost."""
    rmse = {name: c["mean"]["rmse_pct"] for name, c in configs.items()}
    out = {"label_source_over_trtr": rmse["label_source"] / rmse["trtr"],
           "tstr_over_trtr": rmse["tstr"] / rmse["trtr"], "targets": dict(TARGETS)}
    for name in rmse:
        if name.endswith("+synthetic"):
            out[f"{name}_over_{name.removesuffix('+synthetic')}"] = rmse[name] / rmse[name.removesuffix("+synthetic")]
    return out


# ----------------------------------------------------------------------------------------------------------------
# plot

def plot(result: dict, path: str | Path) -> None:
    """Bar chart of each configuration's mean RMSE on the real test windows, the seeds as dots, sd as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from common import atomic_write
    names = list(result["configurations"])
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 4))
    for k, name in enumerate(names):
        c = result["configurations"][name]
        ax.bar(k, c["mean"]["rmse_pct"], yerr=c["sd"]["rmse_pct"], capsize=4,
               color="tab:red" if c["n_synthetic"] == 0 else "tab:blue", alpha=0.7)
        seeds = [r["overall"]["rmse_pct"] for r in c["runs"]]
        ax.plot([k] * len(seeds), seeds, "k.", ms=5)
    ax.axhline(result["configurations"]["trtr"]["mean"]["rmse_pct"], color="grey", ls="--", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    b, s = result["budget"], result["settings"]
    ax.set(ylabel="RMSE on the real test windows [SOC %]",
           title=f"N = {s['n_windows']}, budget {b.get('name', 'custom')} (hidden {b['hidden']}, lr {b['lr']:g}"
                 f"{' cosine to %g' % b['min_lr'] if b.get('lr_decay') == 'cosine' else ''}, {b['epochs']} epochs), "
                 f"seeds {result['seeds']}{', %s labels' % s['soc_labels'] if 'soc_labels' in s else ''}")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
