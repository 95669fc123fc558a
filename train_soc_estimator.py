"""
Train the paper's LSTM SOC estimator on the LG 18650HG2 drive cycles and ship it as a Keras .h5.

Paper defaults: 300-step windows at stride 300 from the 18 training files (0/10/25 degC), target = SOC at the window's
last step, Adam 1e-5, Huber loss, batch 32, up to 1000 epochs, early stopping (patience 50) on a validation split
of 0.2 (the LAST 20 % of the windows, as Keras' validation_split takes them). Faster schedules via flags.

    python train_soc_estimator.py --raw-dir /path/to/lg_hg2            # paper schedule (days on a CPU)
    python train_soc_estimator.py --raw-dir ... --lr 1e-3 --lr-decay cosine --epochs 40 --threads 1

On generate.py's output (--train-data: .npy, .csv or .parquet with its .json sidecar, physical units or --scaled),
alone (validated on the last --val-split of its windows, tested on --test-data) or with real cycles (--raw-dir:
validated on the last --val-split of the real training windows, as without --train-data, tested on the raw test
files; --real-fraction F or --real-windows N of the other real training windows join the synthetic ones):

    python train_soc_estimator.py --train-data synthetic.parquet --lr 1e-3 --epochs 30 --hidden 64
    python train_soc_estimator.py --train-data synthetic.parquet --raw-dir ... --real-fraction 0.1
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

import lg_dataset
from common import OneLineParser, UserError, atomic_write, cli, int_at_least, resolve_device
from metrics import soc_windows
from soc_estimator import SOCLSTM, SOCModelError, load_keras_h5, save_keras_h5


# -----------------------------------------------------------------------------
# training

def lr_at(epoch: int, lr: float, decay: str, epochs: int, min_lr: float, step_every: int, gamma: float) -> float:
    """Learning rate of a (0-based) epoch. Per-epoch schedules only: simple to resume."""
    if decay == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(epoch, epochs) / max(1, epochs)))
    if decay == "step":
        return max(min_lr, lr * gamma ** (epoch // step_every))
    return lr


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))  # a kill mid-write leaves the previous checkpoint intact


@torch.no_grad()
def predict(model: SOCLSTM, X: np.ndarray, device: torch.device, batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(X[i:i + batch_size]).to(device)).squeeze(-1).cpu().numpy()
           for i in range(0, len(X), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def val_scores(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Validation loss (Keras' Huber, delta 1) and RMSE in SOC %."""
    return (float(F.huber_loss(torch.from_numpy(pred), torch.from_numpy(y)).item()),
            float(np.sqrt(np.mean((pred.astype(np.float64) - y) ** 2)) * 100))


def train_epoch(model: SOCLSTM, opt: torch.optim.Optimizer, Xtr: np.ndarray, ytr: np.ndarray, perm: np.ndarray,
                batch_size: int, device: torch.device) -> float:
    """One pass over the training windows in the order perm; -> the summed Huber loss."""
    model.train()
    tot = 0.0
    for i in range(0, len(perm), batch_size):
        idx = np.sort(perm[i:i + batch_size])
        x = torch.from_numpy(Xtr[idx]).to(device)
        y = torch.from_numpy(ytr[idx]).to(device)
        loss = F.huber_loss(model(x).squeeze(-1), y)  # Keras Huber, delta 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tot += loss.item() * len(idx)
    return tot


def load_checkpoint(path: Path) -> dict:
    """weights_only=True: the checkpoint holds tensors, numbers, strings, lists and dicts only, so loading a file
    someone sent can never run code."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or not {"model", "opt", "epoch", "history"} <= set(saved):
            raise ValueError("not a checkpoint of train_soc_estimator.py")
    except Exception as err:   # damaged, foreign, or holding objects that safe loading refuses
        raise SOCModelError(f"{path}: not a loadable checkpoint ({type(err).__name__}); delete it or pass another "
                            f"--checkpoint, and train without --resume") from None
    return saved


def train(model: SOCLSTM, Xtr: np.ndarray, ytr: np.ndarray, Xval: np.ndarray, yval: np.ndarray, cfg: dict,
          ckpt_path: Path, device: torch.device, resume: bool = False, log=print) -> dict:
    """Adam + Huber, early stopping on the validation loss; returns the checkpoint dict (best weights inside).
    cfg keys: lr, lr_decay, min_lr, step_every, gamma, epochs, patience, batch_size, seed, and optionally
    average_from: from that (1-based) epoch on, also keep the running mean of the end-of-epoch weights (stochastic
    weight averaging, Izmailov et al. 2018) and let it compete with the epoch's own weights for the best state."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])  # Keras' Adam: betas 0.9/0.999, eps 1e-7
    for g in opt.param_groups:
        g["eps"] = 1e-7
    ck = {"epoch": 0, "best_val": float("inf"), "best_epoch": -1, "bad_epochs": 0, "history": [], "best_state": None,
          "best_source": None}
    average_from = cfg.get("average_from", 0)
    avg = AveragedModel(model) if average_from else None
    if resume and ckpt_path.exists():
        saved = load_checkpoint(ckpt_path)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        if avg is not None and saved.get("avg") is not None:
            avg.load_state_dict(saved["avg"])
        torch.set_rng_state(saved["torch_rng"])
        ck = saved
        log(f"resumed from {ckpt_path} at epoch {ck['epoch']}")
    n = len(Xtr)
    while ck["epoch"] < cfg["epochs"] and ck["bad_epochs"] < cfg["patience"]:
        ep = ck["epoch"]
        lr = lr_at(ep, cfg["lr"], cfg["lr_decay"], cfg["epochs"], cfg["min_lr"], cfg["step_every"], cfg["gamma"])
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.time()
        perm = np.random.default_rng(cfg["seed"] + ep).permutation(n)  # per-epoch seed: resumable
        tot = train_epoch(model, opt, Xtr, ytr, perm, cfg["batch_size"], device)
        val, val_rmse = val_scores(predict(model, Xval, device), yval) if len(Xval) else (tot / n, float("nan"))
        ck["epoch"] = ep + 1
        entry = {"epoch": ep + 1, "lr": lr, "loss": tot / n, "val_loss": val, "val_rmse_pct": val_rmse}
        candidates = [(val, model, "epoch")]
        if avg is not None and ep + 1 >= average_from and len(Xval):
            avg.update_parameters(model)
            entry["val_loss_avg"], entry["val_rmse_avg_pct"] = val_scores(predict(avg.module, Xval, device), yval)
            candidates.append((entry["val_loss_avg"], avg.module, f"mean of epochs {average_from}..{ep + 1}"))
        entry["seconds"] = time.time() - t0
        ck["history"].append(entry)
        best_val, best_model, source = min(candidates, key=lambda c: c[0])
        if best_val < ck["best_val"]:
            ck.update(best_val=best_val, best_epoch=ep + 1, bad_epochs=0, best_source=source,
                      best_state={k: v.detach().cpu().clone() for k, v in best_model.state_dict().items()})
        else:
            ck["bad_epochs"] += 1
        ck.update(model=model.state_dict(), opt=opt.state_dict(), torch_rng=torch.get_rng_state(), cfg=cfg,
                  avg=avg.state_dict() if avg is not None else None)
        atomic_torch_save(ck, ckpt_path)
        avg_note = f" average {entry['val_rmse_avg_pct']:.2f}%" if "val_rmse_avg_pct" in entry else ""
        log(f"epoch {ep + 1}: lr {lr:.2e} loss {tot / n:.3e} val_loss {val:.3e} val_rmse {val_rmse:.2f}%{avg_note} "
            f"({entry['seconds']:.0f} s)")
    if ck["best_state"] is not None:
        model.load_state_dict(ck["best_state"])  # Keras' EarlyStopping(restore_best_weights) equivalent
    return ck


# -----------------------------------------------------------------------------
# test metrics and plots

def metrics(pred: np.ndarray, y: np.ndarray, index: list[dict]) -> dict:
    """MAE and RMSE in SOC % per test file, per temperature (pooled over its windows) and overall."""
    err = (pred - y) * 100

    def mm(e):
        return {"mae_pct": float(np.abs(e).mean()), "rmse_pct": float(np.sqrt((e ** 2).mean())), "windows": len(e)}
    out = {"per_file": {}, "per_temp": {}}
    for it in index:
        out["per_file"][it["file"]] = mm(err[it["start"]:it["stop"]])
    for temp in dict.fromkeys(it["temp"] for it in index):
        out["per_temp"][temp] = mm(np.concatenate([err[it["start"]:it["stop"]] for it in index
                                                   if it["temp"] == temp]))
    out["overall"] = mm(err)
    return out


def plot_test_cycles(pred: np.ndarray, y: np.ndarray, index: list[dict], stride: int, window: int,
                     m: dict, out_dir: Path) -> list[Path]:
    """One PNG per test cycle: estimated vs true SOC at each window's end, against test time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for it in index:
        s = slice(it["start"], it["stop"])
        t = (np.arange(it["stop"] - it["start"]) * stride + window - 1) / lg_dataset.HZ / 60  # minutes
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(t, y[s] * 100, label="true (Ah counting)", lw=1.5)
        ax.plot(t, pred[s] * 100, label="LSTM estimate", lw=1)
        r = m["per_file"][it["file"]]
        ax.set(xlabel="time [min]", ylabel="SOC [%]",
               title=f"{it['file']}: MAE {r['mae_pct']:.2f} %, RMSE {r['rmse_pct']:.2f} %")
        ax.legend()
        fig.text(0.01, 0.01, "data: Kollmeyer et al., LG 18650HG2, Mendeley Data cp3473x7xv v3 (CC BY 4.0)",
                 fontsize=6)
        fig.tight_layout()
        p = out_dir / f"{it['file'].replace('/', '_')}.png"
        atomic_write(p, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
        plt.close(fig)
        paths.append(p)
    return paths


def load_test_data(args, scaler: dict | None) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """Test windows from --raw-dir (with the training scaler) or the shipped data/lg_test_300_data.npy."""
    if args.raw_dir:
        if scaler is None:
            scaler = lg_dataset.fit_scaler(lg_dataset.load_files(Path(args.raw_dir), lg_dataset.file_list("train"),
                                                                 required=True)[1])
        X, y, index = lg_dataset.soc_windows(args.raw_dir, "test", args.window, args.test_stride, scaler)
        return X, y, index, scaler
    p = Path(args.test_data)
    meta = lg_dataset.load_sidecar(p)
    if not p.is_file() or meta is None:
        raise lg_dataset.DataError(f"{p}: test windows (+ .json sidecar) not found; pass --raw-dir <LG folder> "
                                   f"or --test-data data/lg_test_300_data.npy")
    try:
        a = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        raise lg_dataset.DataError(f"{p}: damaged or not a numeric .npy array; restore it (git checkout "
                                   f"data/lg_test_300_data.npy) or pass --raw-dir") from None
    if a.ndim != 3 or a.shape[1] != args.window or a.shape[2] < 4:
        raise lg_dataset.DataError(f"{p}: shape {a.shape}, expected [n, {args.window}, 4] (V, I, T, SOC)")
    X = np.ascontiguousarray(a[..., :3], np.float32)
    y = np.ascontiguousarray(a[:, -1, 3], np.float32)
    return X, y, meta["file_index"], meta["scaler"]


def missing_test_files(index: list[dict]) -> list[str]:
    have = {it["file"] for it in index}
    return [f for f in lg_dataset.file_list("test") if f not in have]


# -----------------------------------------------------------------------------
# generate.py's output as training windows

ID_COLUMNS = ("sequence", "step")   # generate.py's long format: one row per (sequence, step)


def sidecar_of(path: Path) -> Path:
    """generate.py writes <output>.json next to <output> (synthetic.parquet -> synthetic.parquet.json)."""
    return path.with_name(path.name + ".json")


def read_generated(path: str | Path) -> tuple[np.ndarray, dict]:
    """generate.py's output -> (float64 [n, L, 4] V, I, T, SOC as written, its sidecar). Refuses (one line) a
    missing file or sidecar, an unknown format, columns other than the sidecar's, ragged sequences, NaN/inf."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: synthetic data not found; pass the output of python generate.py -o FILE")
    side_path = sidecar_of(path)
    try:
        side = json.loads(side_path.read_text())
        columns, scaled = list(side["columns"]), bool(side["scaled"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: its sidecar {side_path.name} is missing or lacks 'columns' and 'scaled'; keep "
                        f"the .json that generate.py wrote next to it") from None
    if len(columns) != 4 or (side.get("scaler") is None and not scaled):
        raise UserError(f"{side_path}: expected 4 columns (V, I, T, SOC) and a scaler, got {columns}; regenerate "
                        f"with python generate.py")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            raise UserError(f"{path}: damaged or not a numeric .npy array; regenerate it") from None
        if x.ndim != 3 or x.shape[2] != 4:
            raise UserError(f"{path}: shape {x.shape}, expected [n, L, 4] (V, I, T, SOC); regenerate it")
    elif suffix in (".csv", ".parquet"):
        x = long_to_array(path, columns)
    else:
        raise UserError(f"{path}: unknown format {suffix or '(none)'}; pass generate.py's .npy, .csv or .parquet")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x).all(axis=(1, 2))
    if bad.any():
        raise UserError(f"{path}: {int(bad.sum())} of {len(x)} sequences hold NaN/inf (a diverged generator); "
                        f"drop them or generate from another epoch")
    if len(x) == 0:
        raise UserError(f"{path}: no sequences; generate some with python generate.py -n N")
    return x, side


def long_to_array(path: Path, columns: list[str]) -> np.ndarray:
    """generate.py's long table (one row per sequence and step) -> [n, L, 4] in the sidecar's column order."""
    import pandas as pd
    try:
        table = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except Exception as err:   # pandas and pyarrow raise many types for a damaged file
        raise UserError(f"{path}: unreadable ({type(err).__name__}); regenerate it") from None
    missing = [c for c in (*ID_COLUMNS, *columns) if c not in table.columns]
    if missing:
        raise UserError(f"{path}: columns {missing} missing (has {list(table.columns)}); pass generate.py's "
                        f"output with its own sidecar")
    table = table.sort_values(list(ID_COLUMNS), kind="stable")
    counts = table.groupby("sequence", sort=True).size().to_numpy()
    if len(counts) == 0 or (counts != counts[0]).any():
        raise UserError(f"{path}: sequences of unequal length ({counts.min() if len(counts) else 0}.."
                        f"{counts.max() if len(counts) else 0} steps); pass generate.py's output unchanged")
    try:
        values = table[columns].to_numpy(np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: non-numeric values in {columns}; regenerate it") from None
    return values.reshape(len(counts), counts[0], 4)


def generated_windows(path: str | Path, window: int, scaler: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """generate.py's output -> (X float32 [m, window, 3] V, I, T scaled with `scaler` (the estimator's), y [m] SOC
    at each window's last step, what was read). Windows of `window` steps at stride `window`, aligned to each
    sequence's end (as metrics.soc_windows); the values go to physical units with the file's own scaler and back
    with the estimator's, so data scaled by another run's scaler still reads right."""
    path = Path(path)
    x, side = read_generated(path)
    if x.shape[1] < window:
        raise UserError(f"{path}: sequences of {x.shape[1]} steps are shorter than the {window}-step window; "
                        f"pass a smaller --window or generate with --steps labelled")
    own = side.get("scaler")
    if side["scaled"] and own is not None:
        x = lg_dataset.unscale(x, own)
    if not side["scaled"] or own is not None:
        x = lg_dataset.scale(x, scaler)
    w = soc_windows(x, window)
    info = {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "sidecar": {k: side.get(k) for k in ("run", "epoch", "seed", "soc", "scaled", "steps", "n_sequences")},
            "sequences": len(x), "steps": int(x.shape[1]), "windows": len(w)}
    return np.ascontiguousarray(w[..., :3], np.float32), np.ascontiguousarray(w[:, -1, 3], np.float32), info


def real_share(args: argparse.Namespace, n_available: int) -> int:
    """How many real training windows join the synthetic ones: --real-windows N, or --real-fraction F of them."""
    if args.real_windows is not None:
        if args.real_windows > n_available:
            raise UserError(f"{args.raw_dir}: --real-windows {args.real_windows}, but only {n_available} real "
                            f"training windows are left besides the validation split; pass at most that")
        return args.real_windows
    return round((args.real_fraction or 0.0) * n_available)


def mixed_training_data(args: argparse.Namespace) -> tuple:
    """--train-data (with --raw-dir: validation and test on real cycles, a real share beside the synthetic windows)
    -> (Xtr, ytr, Xval, yval, what was trained on, test tuple). Every input read before the first write."""
    if (args.real_fraction is not None or args.real_windows is not None) and not args.raw_dir:
        raise UserError(f"{args.train_data}: --real-fraction / --real-windows need --raw-dir <LG folder> (the real "
                        f"training cycles)")
    if args.raw_dir:
        X, y, tr_index, test = read_raw_dir(args)
        k = int(len(X) * (1 - args.val_split))   # validation as without --train-data: the last real windows
        Xs, ys, info = generated_windows(args.train_data, args.window, test[3])
        n_real = real_share(args, k)
        pick = np.sort(np.random.default_rng(args.seed).permutation(k)[:n_real])
        Xtr, ytr = np.concatenate([Xs, X[pick]]), np.concatenate([ys, y[pick]])
        Xval, yval = X[k:], y[k:]
        info.update(real_files=[it["file"] for it in tr_index], validation="the last "
                    f"{args.val_split:g} of the real training windows")
    else:
        test = load_test_data(args, None)
        Xs, ys, info = generated_windows(args.train_data, args.window, test[3])
        k = int(len(Xs) * (1 - args.val_split))   # as Keras' validation_split: the last synthetic windows
        Xtr, ytr, Xval, yval, n_real = Xs[:k], ys[:k], Xs[k:], ys[k:], 0
        info.update(validation=f"the last {args.val_split:g} of the synthetic windows")
    n_syn = len(Xtr) - n_real
    if len(Xtr) < 1:
        raise UserError(f"{args.train_data}: no training windows left after the validation split; generate more "
                        f"sequences or lower --val-split")
    info.update(synthetic_windows=n_syn, real_windows=n_real, real_fraction=args.real_fraction,
                real_share=n_real / len(Xtr))
    return Xtr, ytr, Xval, yval, info, test


# -----------------------------------------------------------------------------
# command line

def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (the share of windows kept for validation), got {text}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (the share of the real training windows used), "
                                         f"got {text}")
    return value


def output_path(args: argparse.Namespace) -> Path:
    """--out, or a new file under results/; an existing file is replaced only with --overwrite."""
    if args.out is None:
        return Path("results") / f"{int(time.time())}_soc_estimator" / "lg_positive_temp_300_steps.h5"
    out = Path(args.out)
    if out.exists() and not (args.overwrite or args.evaluate):
        raise SOCModelError(f"{out}: exists; pass --overwrite to replace it, or another --out")
    if out.parent.exists() and not out.parent.is_dir():
        raise SOCModelError(f"{out.parent}: not a folder; pass another --out")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="train_soc_estimator.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-dir", help="LG HG2 folder with 0degC/ 10degC/ 25degC/ (Digatron .csv or .parquet tables)")
    p.add_argument("--out", default=None, help="Keras .h5 to write (default: results/<unix time>_soc_estimator/"
                   "lg_positive_temp_300_steps.h5, a new file: the shipped model in soc_models/ is never the default)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (refused otherwise)")
    p.add_argument("--evaluate", metavar="MODEL", help="no training: test metrics and plots of a Keras model file")
    p.add_argument("--test-data", default="data/lg_test_300_data.npy",
                   help="shipped test windows, used when --raw-dir is not given")
    p.add_argument("--train-data", metavar="FILE", help="train on generate.py's output (.npy, .csv or .parquet with "
                   "its .json sidecar; physical units or --scaled) instead of real cycles, or beside them")
    real = p.add_mutually_exclusive_group()
    real.add_argument("--real-fraction", type=_share, metavar="F", help="with --train-data and --raw-dir: this "
                      "share of the real training windows (drawn with --seed) joins the synthetic ones (default 0)")
    real.add_argument("--real-windows", type=int_at_least(0), metavar="N",
                      help="with --train-data and --raw-dir: N real training windows join the synthetic ones")
    p.add_argument("--hidden", type=int_at_least(2), default=256,
                   help="LSTM and dense width of the estimator (the paper: 256)")
    p.add_argument("--window", type=int_at_least(1), default=300)
    p.add_argument("--stride", type=int_at_least(1), default=300, help="training window stride")
    p.add_argument("--test-stride", type=int_at_least(1), default=300)
    p.add_argument("--val-split", type=_fraction, default=0.2, help="last fraction of the windows (as Keras)")
    p.add_argument("--batch-size", type=int_at_least(1), default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lr-decay", choices=["none", "cosine", "step"], default="none")
    p.add_argument("--min-lr", type=float, default=1e-5, help="floor of the cosine/step decay")
    p.add_argument("--step-every", type=int, default=10, help="step decay: epochs between reductions")
    p.add_argument("--gamma", type=float, default=0.5, help="step decay factor")
    p.add_argument("--epochs", type=int_at_least(1), default=1000)
    p.add_argument("--patience", type=int_at_least(1), default=50)
    p.add_argument("--average-from", type=int, default=0, metavar="EPOCH",
                   help="from this epoch on, also keep the running mean of the end-of-epoch weights (stochastic weight "
                        "averaging) and export it when its validation loss is the best (0: off, as the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--init", metavar="MODEL", help="start from the weights of this Keras .h5 (fine-tuning, e.g. the "
                   "authors' model on your own cells) instead of a random initialisation")
    p.add_argument("--checkpoint", help="default: <out>.ckpt.pt")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--plots-dir", help="default: <out dir>/test_cycles")
    return p.parse_args(argv)


def read_raw_dir(args: argparse.Namespace) -> tuple:
    """(X, y, index) of the training windows and load_test_data's tuple, scaled with the training files' scaler."""
    if not args.raw_dir:
        raise lg_dataset.DataError("training needs --raw-dir <LG folder with 0degC/ 10degC/ 25degC/>")
    raw = Path(args.raw_dir)
    lg_dataset.check_raw_dir(raw, lg_dataset.file_list("train") + lg_dataset.file_list("test"))
    scaler = lg_dataset.fit_scaler(lg_dataset.load_files(raw, lg_dataset.file_list("train"), required=True)[1])
    X, y, tr_index = lg_dataset.soc_windows(raw, "train", args.window, args.stride, scaler)
    Xte, yte, index, _ = load_test_data(args, scaler)
    if not len(Xte) or len(X) < 2:
        raise lg_dataset.DataError(f"{raw}: {len(X)} training and {len(Xte)} test windows of {args.window} "
                                   f"steps; the folder needs the paper's training and test files")
    return X, y, tr_index, (Xte, yte, index, scaler)


def check_checkpoint_path(ckpt: Path, args: argparse.Namespace) -> None:
    """--resume needs the checkpoint; without it an existing one (another run's) is replaced only with --overwrite."""
    if args.resume and not ckpt.is_file():
        raise SOCModelError(f"{ckpt}: no checkpoint to resume; pass the --out (or --checkpoint) of the run "
                            f"to resume, or drop --resume")
    if not args.resume and ckpt.exists() and not args.overwrite:
        raise SOCModelError(f"{ckpt}: a checkpoint of another run is there; pass --resume to continue it, "
                            f"--overwrite to replace it, or another --out")


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device, _ = resolve_device(args.device)
    out = output_path(args)
    plots = Path(args.plots_dir) if args.plots_dir else out.parent / "test_cycles"
    if args.evaluate and args.train_data:
        raise UserError(f"{args.evaluate}: --evaluate tests a model, --train-data trains one; pass one of them")
    if args.evaluate:
        model = load_keras_h5(args.evaluate).to(device)
        Xte, yte, index, scaler = load_test_data(args, None)
        ck, side = None, {}
    else:
        if args.train_data:
            Xtr, ytr, Xval, yval, trained_on, (Xte, yte, index, scaler) = mixed_training_data(args)
            print(f"{len(Xtr)} training windows ({trained_on['synthetic_windows']} synthetic, "
                  f"{trained_on['real_windows']} real), {len(Xval)} validation ({trained_on['validation']}), "
                  f"device {device}, {torch.get_num_threads()} threads", flush=True)
            tr_files = trained_on.get("real_files", [])
        else:
            if args.real_fraction is not None or args.real_windows is not None:
                raise UserError("--real-fraction / --real-windows choose the real share beside --train-data; pass "
                                "--train-data FILE, or drop them to train on the real cycles alone")
            X, y, tr_index, (Xte, yte, index, scaler) = read_raw_dir(args)   # every input before the first write
            k = int(len(X) * (1 - args.val_split))  # Keras' validation_split: the last fraction, before shuffling
            Xtr, ytr, Xval, yval, trained_on = X[:k], y[:k], X[k:], y[k:], None
            tr_files = [it["file"] for it in tr_index]
            print(f"{len(X)} training windows ({k} train, {len(X) - k} validation), device {device}, "
                  f"{torch.get_num_threads()} threads", flush=True)
        model = (load_keras_h5(args.init) if args.init else SOCLSTM(hidden=args.hidden)).to(device)
        cfg = {key: getattr(args, key) for key in ("lr", "lr_decay", "min_lr", "step_every", "gamma", "epochs",
                                                   "patience", "batch_size", "seed", "average_from")}
        ckpt = Path(args.checkpoint) if args.checkpoint else out.with_name(out.stem + ".ckpt.pt")
        check_checkpoint_path(ckpt, args)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ck = train(model, Xtr, ytr, Xval, yval, cfg, ckpt, device, resume=args.resume,
                   log=lambda s: print(s, flush=True))
        save_keras_h5(model.cpu(), out)
        model.to(device)
        side = {"train_files": tr_files, "train_windows": len(Xtr), "val_windows": len(Xval),
                "trained_on": trained_on or {"raw_dir": args.raw_dir},
                "config": cfg, "init": args.init, "epochs_run": ck["epoch"], "best_epoch": ck["best_epoch"],
                "best_source": ck.get("best_source"),
                "best_val_loss": ck["best_val"], "history": ck["history"]}
    pred = predict(model, Xte, device)
    m = metrics(pred, yte, index)
    missing = missing_test_files(index)
    for f, r in m["per_file"].items():
        print(f"{f:22s} MAE {r['mae_pct']:.2f} %  RMSE {r['rmse_pct']:.2f} %  ({r['windows']} windows)")
    for t, r in list(m["per_temp"].items()) + [("overall", m["overall"])]:
        print(f"{t:22s} MAE {r['mae_pct']:.2f} %  RMSE {r['rmse_pct']:.2f} %")
    if missing:
        print(f"missing test files (not in the metrics): {', '.join(missing)}")
    plot_test_cycles(pred, yte, index, args.test_stride, args.window, m, plots)
    if args.evaluate:
        return m
    h = model.hidden
    side.update({"model": out.name, "architecture": f"LSTM({h}, selu, seq) - LSTM({h}, selu) - Dense({h}, selu) - "
                 f"Dense({h // 2}, selu) - Dense(1)", "input": "scaled voltage, current, temperature",
                 "window": args.window, "train_stride": args.stride, "test_stride": args.test_stride,
                 "scaler": scaler, "test_files": [it["file"] for it in index], "missing_test_files": missing,
                 "test_metrics": m, "data": lg_dataset.CITATION, "device": str(device),
                 "command": "python train_soc_estimator.py " + " ".join(argv)})
    atomic_write(out.with_suffix(".json"), json.dumps(side, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return m


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return cli(lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
