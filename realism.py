"""Can a strong classifier tell synthetic windows from real ones? The realism scores of the downstream issue.

    window_features(x, scaler)          per-window summary features [n, F] (levels, spreads, steps, memory, physics)
    gbt_score(real, fake, seed, ...)    gradient-boosted trees on those features, 5-fold cross-validated
    gru_score(real, fake, seed, ...)    a post-hoc 2-layer GRU on the sequences, early stopping on a validation part
    realism_scores(real, fake, ...)     both, each with its real-vs-real floor, at >= 1000 sequences per side
    flat(result) / describe(result)     for a flat metrics.json and for printing (small samples say so)

Every score is |held-out accuracy - 0.5|: 0 = the classifier cannot tell, 0.5 = it always can. A score means
little without its floor: the same classifier on two disjoint samples of real windows of the same size (which can
only tell by chance). Arrays are [n, L, >=3] scaled V, I, T (extra columns, e.g. SOC, are ignored), real and
synthetic over the same steps (the exported steps: the last 300 of the 600 generated, and the real windows' same
steps). The quick metrics and TimeGAN's small discriminative score stay in metrics.py for the trainer's snapshots.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.inspection import permutation_importance
from sklearn.model_selection import StratifiedKFold
from torch.nn import functional as F

from common import UserError
from metrics import PostHocGRU, as_tensor, feature_stats, predict, resistance_line, seeded, subsample

CHANNELS = ("V", "I", "T")
QUANTILES = (5, 25, 50, 75, 95)
LAGS = (1, 10, 50)            # steps: 0.1, 1 and 5 s at 10 Hz
CHANGE_TOL = 1e-6             # of the channel's scaled range: a step smaller than this is "no change" (the real
# sensors log in quanta: current 2.55 mA = 1e-4 of its range, temperature 0.105 degC = 4e-3; float32 noise 1e-7)
MIN_PER_SIDE = 1000           # the sample size; fewer are scored but flagged small_sample
WATCH_ONLY_BELOW = 100        # fewer sequences per side: a figure for watching, not a claim (printed so)
REFUSE_BELOW = 10             # too few to split into folds and held-out parts at all: refused


# what the keys realism.flat puts into evaluate.py's metrics.json mean (evaluate.py adds them to its docs)
METRIC_DOCS = {
    "realism_n_per_side": "sequences per side behind the realism scores: min(synthetic sequences, real windows / 2 "
                          f"(the floor needs two disjoint real samples), {MIN_PER_SIDE}); under {MIN_PER_SIDE} a "
                          f"small sample (realism.json small_sample), under {WATCH_ONLY_BELOW} for watching only",
    "realism_gbt_score": "lower: |held-out accuracy - 0.5| of gradient-boosted trees (scikit-learn) on per-window "
                         "summary features (levels, spreads, quantiles, step statistics, lag autocorrelations, the "
                         "voltage's slope and residual on the current), every window held out once over 5 folds; "
                         "0 = cannot tell synthetic from real, 0.5 = always can; read against realism_gbt_floor; "
                         "realism.json names the features that tell most (permutation importance)",
    "realism_gbt_floor": "reference: the same trees on two disjoint samples of real windows of the same size (what "
                         "chance gives)",
    "realism_gru_score": "lower: |held-out accuracy - 0.5| of a post-hoc 2-layer GRU (hidden 64) on the sequences, "
                         "30 % held out, early stopping on a validation part; read against realism_gru_floor",
    "realism_gru_floor": "reference: the same GRU on two disjoint samples of real windows of the same size",
}


# ----------------------------------------------------------------------------------------------------------------
# features

LEVELS = ("mean", "std", *(f"q{q:02d}" for q in QUANTILES), "range")


def level_features() -> list[str]:
    """The names of the level features alone (per channel: mean, spread, quantiles, range)."""
    return [f"{c}_{k}" for c in CHANNELS for k in LEVELS]


def feature_names() -> list[str]:
    """The names of window_features' columns, in order. I_mean is the net charge per unit time (discharge < 0)."""
    names = []
    for c in CHANNELS:
        names += [*(f"{c}_{k}" for k in LEVELS), f"{c}_step_changed_share", f"{c}_step_mean_abs", f"{c}_step_std",
                  f"{c}_step_std_over_mean_abs", f"{c}_step_p99_abs", f"{c}_step_kurtosis",
                  *(f"{c}_acf_lag{k}" for k in LAGS)]
    return names + ["resistance", "resistance_residual_std"]


def window_features(x: np.ndarray, scaler: dict | None = None) -> np.ndarray:
    """[n, L, >=3] scaled V, I, T -> float64 [n, len(feature_names())]. With a scaler in physical units (V, A, degC;
    resistance in ohm), else in scaled units. Per channel: levels (mean, std, quantiles, range), steps (share of
    steps that change, mean |step|, std of the steps, its ratio to the mean |step| (a held demand that jumps: ~3.8
    in real current, a glide ~1.3), 99th percentile |step|, kurtosis), autocorrelation at LAGS (0 beyond the
    window); then the least-squares slope of the voltage on the current and the spread of what it leaves.
    NaN/inf in a window give NaN features (the classifiers take NaN as a value of its own)."""
    x = np.asarray(x, np.float64)[..., :3]
    if x.ndim != 3 or x.shape[2] != 3 or x.shape[1] < 3:
        raise ValueError(f"windows must be [n, L >= 3, >= 3] (V, I, T), got {x.shape}")
    span = np.ones(3)
    if scaler is not None:
        lo, hi = np.asarray(scaler["min"], np.float64)[:3], np.asarray(scaler["max"], np.float64)[:3]
        x, span = x * (hi - lo) + lo, hi - lo
    x = np.where(np.isfinite(x), x, np.nan)
    cols = []
    for c in range(3):
        v = x[..., c]
        cols += [v.mean(1), v.std(1), *np.percentile(v, QUANTILES, axis=1), np.ptp(v, axis=1)]
        cols += step_features(np.diff(v, axis=1), CHANGE_TOL * span[c])
        cols += [lag_autocorrelation(v, k) for k in LAGS]
    resistance, residual = resistance_line(x[..., 0], x[..., 1])
    cols += [resistance, residual.std(1)]
    return np.stack(cols, axis=1)


def step_features(d: np.ndarray, tol: float) -> list[np.ndarray]:
    """d [n, L-1] one channel's step-to-step differences -> share changed, mean |d|, std, std / mean |d|, p99 |d|,
    kurtosis (0 where the channel never moves)."""
    a = np.abs(d)
    mean_abs, std = a.mean(1), d.std(1)
    dc = d - d.mean(1, keepdims=True)
    m2, m4 = (dc ** 2).mean(1), (dc ** 4).mean(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(mean_abs > 0, std / mean_abs, 0.0)
        kurtosis = np.where(m2 > 0, m4 / m2 ** 2, 0.0)
    return [(a > tol).mean(1), mean_abs, std, ratio, np.percentile(a, 99, axis=1), kurtosis]


def lag_autocorrelation(v: np.ndarray, lag: int) -> np.ndarray:
    """v [n, L] -> [n] autocorrelation at `lag` steps; 0 for a flat window or a lag beyond it (no memory seen)."""
    if lag >= v.shape[1]:
        return np.zeros(len(v))
    vc = v - v.mean(1, keepdims=True)
    var = (vc * vc).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, (vc[:, :-lag] * vc[:, lag:]).sum(1) / var, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# the two classifiers

def gbt_score(real: np.ndarray, fake: np.ndarray, seed: int = 0, scaler: dict | None = None, folds: int = 5,
              top: int = 5, repeats: int = 5, features: list[str] | None = None) -> dict:
    """Gradient-boosted trees (sklearn's HistGradientBoostingClassifier, its defaults) learn real (1) vs synthetic
    (0) from window_features (or only the named `features`, e.g. the levels alone); accuracy over stratified
    `folds`-fold cross-validation, so that every window is held out once; the features that tell most:
    permutation importance (drop in held-out accuracy when one feature is shuffled, mean over `repeats` shuffles
    and the folds), the `top` largest. One feature that tells alone takes all the importance: the others then
    tell too, but are not needed (score them again without it)."""
    names = feature_names()
    keep = [names.index(f) for f in features] if features is not None else list(range(len(names)))
    names = [names[k] for k in keep]
    features = np.concatenate([window_features(real, scaler), window_features(fake, scaler)])[:, keep]
    labels = np.r_[np.ones(len(real), int), np.zeros(len(fake), int)]
    folds = min(folds, len(real), len(fake))
    correct, importance = 0, np.zeros(features.shape[1])
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        model = HistGradientBoostingClassifier(random_state=seed).fit(features[train], labels[train])
        correct += int((model.predict(features[test]) == labels[test]).sum())
        importance += permutation_importance(model, features[test], labels[test], scoring="accuracy",
                                             n_repeats=repeats, random_state=seed).importances_mean / folds
    accuracy = correct / len(labels)
    order = np.argsort(-importance)[:top]
    return {"score": abs(accuracy - 0.5), "accuracy": accuracy,
            "top_features": [[names[k], float(importance[k])] for k in order]}


def gru_score(real: np.ndarray, fake: np.ndarray, seed: int = 0, device: torch.device | str = "cpu",
              hidden: int = 64, max_epochs: int = 30, patience: int = 5, batch_size: int = 64, lr: float = 1e-3,
              test_share: float = 0.3, val_share: float = 0.2) -> dict:
    """A post-hoc 2-layer GRU (metrics.PostHocGRU: inputs standardised with the training part's statistics) learns
    real (1) vs synthetic (0) on the sequences. Each side is split alike: test_share held out, val_share of the rest
    for early stopping (the weights of the epoch with the lowest validation loss, after at most max_epochs and
    `patience` epochs without improvement), the rest to train; score = |held-out accuracy - 0.5|."""
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    parts = [split_indices(len(side), test_share, val_share, rng) for side in (real, fake)]

    def part(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.concatenate([real[parts[0][k]], fake[parts[1][k]]])[..., :3]
        y = np.r_[np.ones(len(parts[0][k])), np.zeros(len(parts[1][k]))]
        return as_tensor(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), device), as_tensor(y, device)[:, None]
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = part(0), part(1), part(2)
    with seeded(seed, device):
        model = PostHocGRU(3, hidden, 1, *feature_stats(x_train)).to(device)
        epochs, best_epoch = train_early_stopping(model, x_train, y_train, x_val, y_val, max_epochs, patience,
                                                  batch_size, lr, torch.Generator().manual_seed(seed))
        guess = (predict(model, x_test)[:, 0] > 0).float()
    accuracy = float((guess == y_test[:, 0]).float().mean())
    return {"score": abs(accuracy - 0.5), "accuracy": accuracy, "epochs_run": epochs, "best_epoch": best_epoch,
            "n_train": len(x_train), "n_val": len(x_val), "n_test": len(x_test)}


def split_indices(n: int, test_share: float, val_share: float, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A permutation of range(n) cut into (train, validation, test); each part holds at least one index."""
    perm = rng.permutation(n)
    n_test = min(n - 2, max(1, round(test_share * n)))
    n_val = min(n - n_test - 1, max(1, round(val_share * (n - n_test))))
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]


def train_early_stopping(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor,
                         y_val: torch.Tensor, max_epochs: int, patience: int, batch_size: int, lr: float,
                         generator: torch.Generator) -> tuple[int, int]:
    """Adam on the binary cross-entropy; restores the weights of the best validation loss -> (epochs, best epoch)."""
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_epoch, best_state, epoch = float("inf"), 0, None, 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            idx = idx.to(x.device)
            optim.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(x[idx]), y[idx]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
        model.eval()
        val = float(F.binary_cross_entropy_with_logits(predict(model, x_val), y_val))
        if val < best:
            best, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return epoch, best_epoch


# ----------------------------------------------------------------------------------------------------------------
# both scores with their floors

def sample_size(n_real: int, n_fake: int, max_per_side: int = MIN_PER_SIDE) -> int:
    """Sequences per side: as many synthetic ones as there are, up to max_per_side, while the real windows still
    give two disjoint samples of that size (the score's and the floor's). Refused below REFUSE_BELOW."""
    n = min(n_fake, n_real // 2, max_per_side)
    if n < REFUSE_BELOW:
        raise UserError(f"realism score: {n_fake} synthetic and {n_real} real sequences give {n} per side, "
                        f"too few to score (needs {REFUSE_BELOW}, the issue's protocol {MIN_PER_SIDE}); "
                        f"generate more sequences or pass more real windows")
    return n


def realism_scores(real: np.ndarray, fake: np.ndarray, seed: int = 0, scaler: dict | None = None,
                   device: torch.device | str = "cpu", max_per_side: int = MIN_PER_SIDE, gru: bool = True,
                   gru_kw: dict | None = None) -> dict:
    """The gradient-boosted and (gru=True) GRU scores of `fake` against real windows, each with its floor: the same
    classifier on the same real sample against a disjoint real sample of the same size. real: every real window
    available [m, L, >=3] (the floor needs two disjoint samples), fake [n, L, >=3] over the same steps."""
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real {real.shape} and synthetic {fake.shape} windows must have the same steps")
    n = sample_size(len(real), len(fake), max_per_side)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(real))
    real_a, real_b = real[np.sort(perm[:n])], real[np.sort(perm[n:2 * n])]
    fake_n = subsample(fake, n, rng)
    out = {"n_per_side": n, "small_sample": n < MIN_PER_SIDE, "watch_only": n < WATCH_ONLY_BELOW,
           "steps": int(real.shape[1]), "seed": seed, "units": "physical" if scaler is not None else "scaled",
           "gbt": gbt_score(real_a, fake_n, seed, scaler), "gbt_floor": gbt_score(real_a, real_b, seed, scaler)}
    if gru:
        out["gru"] = gru_score(real_a, fake_n, seed, device, **(gru_kw or {}))
        out["gru_floor"] = gru_score(real_a, real_b, seed, device, **(gru_kw or {}))
    return out


def flat(result: dict) -> dict[str, float]:
    """realism_scores' result as flat numbers for metrics.json (realism_gbt_score, realism_gbt_floor, ...)."""
    out = {"realism_n_per_side": float(result["n_per_side"])}
    for name in ("gbt", "gru"):
        if name in result:
            out[f"realism_{name}_score"] = float(result[name]["score"])
            out[f"realism_{name}_floor"] = float(result[f"{name}_floor"]["score"])
    return out


def describe(result: dict) -> str:
    """One line per classifier, with the sample size, and the small-sample warning where it applies."""
    n = result["n_per_side"]
    note = (f" (fewer than {WATCH_ONLY_BELOW} per side: for watching only, not a claim)" if result["watch_only"]
            else f" (below the protocol's {MIN_PER_SIDE}: small sample)" if result["small_sample"] else "")
    lines = []
    for name, label in (("gbt", "gradient-boosted trees"), ("gru", "2-layer GRU")):
        if name in result:
            r, floor = result[name], result[f"{name}_floor"]
            line = (f"{label}: score {r['score']:.3f} (accuracy {r['accuracy']:.3f}), real-vs-real floor "
                    f"{floor['score']:.3f}, n = {n} per side{note}")
            if "top_features" in r:   # those whose shuffling costs accuracy (one that tells alone leaves 0 to the rest)
                telling = [f"{k} {v:.3f}" for k, v in r["top_features"] if v > 0]
                line += "; telling most: " + (", ".join(telling) or "none (no feature's shuffling costs accuracy)")
            lines.append(line)
    return "\n".join(lines)
