"""Evaluation metrics shared by the training loop and evaluate.py. Arrays are [n, steps, features], scaled:
columns V, I, T min-max scaled with the training data's scaler, then SOC in 0..1.

    quick_metrics(real, fake, scaler, seed)           cheap distribution and physics checks (~1 s on CPU)
    all_metrics(real, fake, scaler, seed, device, ...) quick + post-hoc models (discriminative, predictive, TSTR)

Every metric is a plain float in a flat dict, lower is better unless the name says otherwise (see METRIC_DOCS).
Randomness comes from `seed` only (numpy Generator and a forked torch RNG), so the same seed gives the same
numbers on the same CPU and the caller's global RNG state (e.g. the GAN trainer's) is left untouched.
"""
from contextlib import contextmanager

import numpy as np
import torch
from scipy.stats import wasserstein_distance
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from torch import nn
from torch.nn import functional as F

from soc_estimator import SOCLSTM, counted_soc

FEATURES = ("V", "I", "T", "SOC")
V_LIMITS = (2.5, 4.2)     # volts: LG 18650HG2 datasheet discharge cut-off and charge voltage
T_MARGIN = 5.0            # degC allowed beyond the training data's min..max temperature (the scaler's range)
SOC_RISE_TOL = 1e-4       # SOC per 0.1 s step; the real training windows never rise by more while discharging
# SOC %: a sequence whose labels stray further from the charge count fails. Real windows' own SOC: 0.006 % mean,
# 0.07 % max; the SOC estimator's labels of real windows: 0.6 % mean, 1.7 % max (24 windows), its own jitter
COULOMB_TOL_PCT = 2.0
ACF_MAX_LAG = 50          # autocorrelation lags compared: 1..50 steps = 0.1..5 s at 10 Hz
QUICK_MAX_SEQ = 1000      # the quick metrics subsample each set to this many sequences (keeps them ~1 s)
MMD_MAX_SEQ = 500         # MMD is quadratic in the sample count


def step_means(x: np.ndarray) -> np.ndarray:
    """The paper's input to PCA and t-SNE: per time step, the mean over the features -> [n, steps]."""
    return x.mean(axis=2)


def pca_tsne(real: np.ndarray, fake: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """PCA fitted on the real sequences, applied to both; t-SNE on both together (as the paper does)."""
    real_f, fake_f = step_means(real), step_means(fake)
    pca = PCA(n_components=2, random_state=seed).fit(real_f)
    tsne = TSNE(n_components=2, init="pca", learning_rate="auto", random_state=seed,
                perplexity=min(30.0, (len(real_f) + len(fake_f) - 1) / 3))
    embedded = tsne.fit_transform(np.concatenate([real_f, fake_f]))
    return {"pca_real": pca.transform(real_f), "pca_fake": pca.transform(fake_f),
            "tsne_real": embedded[:len(real_f)], "tsne_fake": embedded[len(real_f):]}


# ----------------------------------------------------------------------------------------------------------------
# what each key means (evaluate.py writes it next to metrics.json; the README lists it)

METRIC_DOCS = {
    "nonfinite_share": "lower: share of synthetic values that are NaN or inf (a diverged generator; 0 expected)",
    "w1_<F>": "lower: Wasserstein-1 distance between real and synthetic values of feature F (V, I, T, SOC), "
              "pooled over all steps, in scaled units (0..1 = the training data's min..max)",
    "w1_mean": "lower: mean of w1_<F> over the features",
    "acf_diff_<F>": "lower: mean |ACF_real - ACF_fake| of feature F over lags 1..50 steps (0.1..5 s); "
                    "ACF per sequence, averaged over sequences",
    "acf_diff_mean": "lower: mean of acf_diff_<F> over the features",
    "mmd2_rbf_flat": "lower: unbiased squared MMD, Gaussian RBF kernel exp(-d^2 / (2 s^2)) on whole flattened "
                     "sequences (steps x features), s = median pairwise distance of the pooled sample "
                     "(near 0, may be slightly negative, for equal distributions); dominated by levels",
    "mmd2_rbf_diff": "lower: as mmd2_rbf_flat on the flattened step-to-step differences x[t+1] - x[t]: "
                     "compares the dynamics, which the level-dominated flat MMD hardly sees",
    "phys_v_out_of_limits": "lower: share of synthetic steps with voltage outside 2.5..4.2 V (LG HG2 limits)",
    "phys_t_out_of_range": "lower: share of synthetic steps with temperature outside the training data's "
                           "min..max temperature widened by 5 degC",
    "phys_v_residual_mv": "closer to real_phys_v_residual_mv: per sequence, the std of the voltage about its "
                          "least-squares line in the current (the part the cell's resistance does not explain), "
                          "in mV, mean over sequences; the SOC estimator reads an excess as SOC moving",
    "phys_resistance_mohm": "closer to real_phys_resistance_mohm: per sequence, the slope of the least-squares "
                            "line of the voltage in the current (the resistance the voltage follows the current "
                            "with), in mOhm, median over sequences; a generator's excess swings the voltage, and "
                            "the SOC label, with the current",
    "phys_soc_out_of_range": "lower: share of synthetic steps with SOC outside [0, 1]",
    "phys_soc_rise_while_discharging": "lower: of the synthetic steps with current < 0 (discharge), the share "
                                       "where SOC rises by more than 1e-4 from the previous step (0 by "
                                       "construction with fused labels: they follow the current)",
    "soc_coulomb_error": "lower: mean over sequences of the mean |SOC_t - SOC_0 - sum(I dt) / (3600 Q)| over each "
                         "sequence's steps, in SOC %: the labels against charge counting (I in A, discharge "
                         "negative; Q: capacity of the training temperature nearest the sequence's mean "
                         "temperature, from the data sidecar); 0 up to float rounding with fused labels, which "
                         "are made of the same count",
    "soc_coulomb_fail_share": "lower: share of sequences whose coulomb error exceeds 2 % SOC (the SOC "
                              "estimator's labels of real windows stay under 1.7 %)",
    "<class>/t_mean_gap": "closer to 0: a conditional class's synthetic mean temperature minus its real windows' "
                          "mean temperature, in degC (scaled units without a scaler)",
    "<class>/class_match": "closer to <class>/real_class_match: share of the class's synthetic sequences whose mean "
                           "temperature is nearest that class's real mean temperature (of all classes' real means): "
                           "the classes told apart as the real ones are; real_class_match is the same for the "
                           "class's real windows",
    "real_phys_<name>": "reference: the same physics check on the real sample (what 'good' looks like); also "
                        "real_soc_coulomb_*",
    "discriminative_score": "lower: |accuracy - 0.5| of a post-hoc 2-layer GRU classifier, real vs synthetic, "
                            "on held-out 20 % (TimeGAN protocol); 0 = indistinguishable, 0.5 = trivially told apart",
    "discriminative_accuracy": "closer to 0.5 is better: the held-out accuracy behind discriminative_score",
    "discriminative_n": "sequences per side behind discriminative_score (at most max_seq; the CPU preset's snapshots "
                        "have 32): under 100 the score is for watching, not a claim; realism.py's scores (gradient-"
                        "boosted trees and a GRU sized for the task, with their real-vs-real floors) use 1000",
    "predictive_mae": "lower: TimeGAN predictive score: a 2-layer GRU trained on synthetic sequences to predict "
                      "every feature of the next step, MAE on real sequences (scaled units)",
    "predictive_mae_real": "reference: the same predictor trained on other real sequences (train-on-real floor)",
    "predictive_n": "sequences each predictor trains on (at most max_seq, at most half the real sample): under 100 "
                    "the predictive scores are for watching, not a claim",
    "tstr_rmse_soc_pct": "lower: the paper's SOC LSTM trained on synthetic windows (label = SOC at the last "
                         "step), RMSE on the real test cycles, SOC in %",
    "tstr_mae_soc_pct": "lower: as tstr_rmse_soc_pct, mean absolute error",
    "trtr_rmse_soc_pct": "reference: the same SOC LSTM trained on as many real training windows, same budget",
    "trtr_mae_soc_pct": "reference: as trtr_rmse_soc_pct, mean absolute error",
    "tstr_n_windows": "training windows of each SOC LSTM behind tstr_* and trtr_* (as many for both, at most "
                      "--tstr-max-windows): under 100 those are for watching, not a claim; evaluate.py --downstream "
                      "runs the protocol that can tell (downstream.json)",
    "tstr_n_test": "real test windows tstr_* and trtr_* are measured on",
}


def settings() -> dict:
    """The fixed constants behind the metrics, for metrics_settings.json."""
    return {"v_limits_V": list(V_LIMITS), "t_margin_degC": T_MARGIN, "soc_rise_tol": SOC_RISE_TOL,
            "acf_max_lag": ACF_MAX_LAG, "quick_max_seq": QUICK_MAX_SEQ, "mmd_max_seq": MMD_MAX_SEQ,
            "mmd_kernel": "gaussian rbf exp(-d^2 / (2 s^2)), s = median pairwise distance of the pooled sample; "
                          "flat: flattened sequences, diff: flattened step-to-step differences"}


# ----------------------------------------------------------------------------------------------------------------
# quick metrics: distributions and physics

def subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most n sequences, drawn without replacement (all of them, in order, when there are fewer)."""
    if len(x) <= n:
        return x
    return x[np.sort(rng.choice(len(x), n, replace=False))]


def marginal_w1(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    out = {f"w1_{name}": float(wasserstein_distance(real[..., f].ravel(), fake[..., f].ravel()))
           for f, name in enumerate(FEATURES[:real.shape[2]])}
    out["w1_mean"] = float(np.mean(list(out.values())))
    return out


def autocorrelation(x: np.ndarray, max_lag: int) -> np.ndarray:
    """[n, L, F] -> [F, max_lag]: ACF at lags 1..max_lag of each sequence and feature, averaged over sequences.
    A constant sequence has no defined ACF; it counts as 0 (no memory), so constant output is penalised."""
    x = x.astype(np.float64)
    xc = x - x.mean(axis=1, keepdims=True)
    n_fft = 1 << (2 * x.shape[1] - 1).bit_length()   # zero padding: linear, not circular, correlation
    spec = np.fft.rfft(xc, n=n_fft, axis=1)
    ac = np.fft.irfft(spec * spec.conj(), n=n_fft, axis=1)[:, :max_lag + 1]
    var = ac[:, :1]
    acf = np.divide(ac[:, 1:], var, out=np.zeros_like(ac[:, 1:]), where=var > 1e-12)
    return acf.mean(axis=0).T


def acf_difference(real: np.ndarray, fake: np.ndarray, max_lag: int = ACF_MAX_LAG) -> dict[str, float]:
    max_lag = min(max_lag, real.shape[1] - 1, fake.shape[1] - 1)
    diff = np.abs(autocorrelation(real, max_lag) - autocorrelation(fake, max_lag)).mean(axis=1)
    out = {f"acf_diff_{name}": float(d) for name, d in zip(FEATURES, diff)}
    out["acf_diff_mean"] = float(diff.mean())
    return out


def mmd2_rbf(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased squared MMD with a Gaussian RBF kernel on flattened sequences; bandwidth by the median heuristic."""
    x = torch.from_numpy(real.reshape(len(real), -1)).double()
    y = torch.from_numpy(fake.reshape(len(fake), -1)).double()
    d2 = torch.cdist(torch.cat([x, y]), torch.cat([x, y])).pow(2)
    off_diag = ~torch.eye(len(d2), dtype=torch.bool)
    sigma2 = d2[off_diag].median().clamp_min(1e-12)
    k = torch.exp(-d2 / (2 * sigma2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    pairs_x, pairs_y = max(1, n * (n - 1)), max(1, m * (m - 1))   # a single sequence: no pairs, term 0
    mmd2 = (kxx.sum() - kxx.diagonal().sum()) / pairs_x + (kyy.sum() - kyy.diagonal().sum()) / pairs_y - 2 * kxy.mean()
    return float(mmd2)


def physics_sanity(x: np.ndarray, scaler: dict) -> dict[str, float]:
    """Shares of physically implausible steps, in physical units (limits: see the constants at the top)."""
    lo, hi = np.asarray(scaler["min"], np.float64), np.asarray(scaler["max"], np.float64)
    phys = x[..., :3].astype(np.float64) * (hi - lo) + lo
    v, i, t = phys[..., 0], phys[..., 1], phys[..., 2]
    resistance, residual = resistance_line(v, i)
    out = {"phys_v_out_of_limits": float(((v < V_LIMITS[0]) | (v > V_LIMITS[1])).mean()),
           "phys_t_out_of_range": float(((t < lo[2] - T_MARGIN) | (t > hi[2] + T_MARGIN)).mean()),
           "phys_v_residual_mv": float(residual.std(1).mean() * 1000),
           "phys_resistance_mohm": float(np.median(resistance) * 1000)}
    if x.shape[2] > 3:
        soc = x[..., 3].astype(np.float64)
        out["phys_soc_out_of_range"] = float(((soc < 0) | (soc > 1)).mean())
        discharging = i[:, 1:] < 0
        rising = np.diff(soc, axis=1) > SOC_RISE_TOL
        out["phys_soc_rise_while_discharging"] = float((discharging & rising).sum() / max(1, discharging.sum()))
        if scaler.get("capacity_ah"):
            gap = coulomb_gap(x, scaler)
            out.update(soc_coulomb_error=float(gap.mean()),
                       soc_coulomb_fail_share=float((gap > COULOMB_TOL_PCT).mean()))
    return out


def resistance_line(v: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """v, i [n, L] in volts and amperes -> ([n] slope of each sequence's least-squares line of voltage in current,
    in ohm: the resistance the voltage follows the current with; [n, L] the voltage about that line: what the
    resistance does not explain). Over a minute the open-circuit voltage hardly moves, so in real windows the
    residual's spread is a few mV; whatever more a generator puts there, the SOC estimator reads as SOC moving."""
    vc, ic = v - v.mean(1, keepdims=True), i - i.mean(1, keepdims=True)
    slope = (vc * ic).sum(1) / np.maximum((ic * ic).sum(1), 1e-12)
    return slope, vc - slope[:, None] * ic


def coulomb_gap(x: np.ndarray, scaler: dict) -> np.ndarray:
    """x [n, L, 4] scaled V, I, T + SOC -> [n] mean |SOC_t - SOC_0 - charge counted since step 0| in SOC %.
    The charge count is soc_estimator.counted_soc (Q per sequence: the scaler's capacity of the training temperature
    nearest its mean temperature), the one the fused labels are made of: their gap is 0 up to float rounding."""
    counted = counted_soc(x, scaler)
    soc = x[..., 3].astype(np.float64)
    return np.abs(soc[:, 1:] - soc[:, :1] - counted[:, 1:]).mean(1) * 100


def per_class(real: np.ndarray, real_classes: np.ndarray, fake: np.ndarray, fake_classes: np.ndarray,
              names: list[str], scaler: dict | None, seed: int, min_fake: int = 4,
              min_real: int = 1, temperature: bool = True) -> dict[str, float]:
    """Conditional data: the quick metrics of each class's synthetic sequences against that class's real ones, as
    '<class>/<metric>' (class k is names[k]; a class with fewer than min_fake / min_real sequences is left out),
    with each class's temperature gap and class match (temperature=False leaves them out)."""
    out = {}
    for k, name in enumerate(names):
        real_k, fake_k = real[real_classes == k], fake[fake_classes == k]
        if len(fake_k) >= min_fake and len(real_k) >= min_real:
            out.update({f"{name}/{key}": v for key, v in quick_metrics(real_k, fake_k, scaler, seed).items()})
            if temperature:
                out.update({f"{name}/{key}": v for key, v in
                            class_temperature(real, real_classes, fake_k, k, scaler).items()})
    return out


def class_temperature(real: np.ndarray, real_classes: np.ndarray, fake_k: np.ndarray, k: int,
                      scaler: dict | None) -> dict[str, float]:
    """Class k's synthetic sequences (fake_k) against the real windows of every class: the gap of their mean
    temperature to class k's real mean (degC with a scaler), and the share of them, and of class k's real windows,
    whose mean temperature is nearest class k's real mean: "separable as the real classes are"."""
    unit = scaler["max"][2] - scaler["min"][2] if scaler is not None else 1.0
    real_k = real[real_classes == k]
    return {"t_mean_gap": float((fake_k[:, :, 2].mean() - real_k[:, :, 2].mean()) * unit),
            "class_match": float((nearest_class(fake_k, real, real_classes) == k).mean()),
            "real_class_match": float((nearest_class(real_k, real, real_classes) == k).mean())}


def nearest_class(x: np.ndarray, real: np.ndarray, real_classes: np.ndarray) -> np.ndarray:
    """For each sequence of x, the class whose real windows' mean temperature is nearest its own (of the classes
    with real windows; real_classes -1 marks a window of no class)."""
    present = np.unique(real_classes[real_classes >= 0])
    centres = np.array([real[real_classes == c, :, 2].mean() for c in present])
    return present[np.abs(x[:, :, 2].mean(1)[:, None] - centres).argmin(1)]


def quick_metrics(real: np.ndarray, fake: np.ndarray, scaler: dict | None, seed: int) -> dict[str, float]:
    """Marginal W1 per feature, ACF difference, MMD (and physics sanity when a scaler is given).
    real and fake: [n, L, F] over the same steps. Each set is subsampled to QUICK_MAX_SEQ sequences."""
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real {real.shape} and fake {fake.shape} must have the same steps and features")
    rng = np.random.default_rng(seed)
    real_s, fake_s = subsample(real, QUICK_MAX_SEQ, rng), subsample(fake, QUICK_MAX_SEQ, rng)
    # a diverged generator gives NaN/inf: say how much, and let the other metrics come out NaN, not crash
    out = {"nonfinite_share": float(1 - np.isfinite(fake).mean())}
    out.update(marginal_w1(real_s, fake_s))
    out.update(acf_difference(real_s, fake_s))
    real_m, fake_m = subsample(real_s, MMD_MAX_SEQ, rng), subsample(fake_s, MMD_MAX_SEQ, rng)
    out["mmd2_rbf_flat"] = mmd2_rbf(real_m, fake_m)
    out["mmd2_rbf_diff"] = mmd2_rbf(np.diff(real_m, axis=1), np.diff(fake_m, axis=1))
    if scaler is not None:
        out.update(physics_sanity(fake, scaler))
        out.update({f"real_{k}": v for k, v in physics_sanity(real, scaler).items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# post-hoc models: discriminative and predictive scores (TimeGAN, Yoon et al. 2019), TSTR for SOC estimation

class PostHocGRU(nn.Module):
    """2-layer GRU; the head reads the last step (one output per sequence) or every step. Inputs are
    standardised per feature with fixed training-set statistics: min-max scaled features vary by a few
    hundredths within a window, and unstandardised the GRU needs many times more steps to see it."""

    def __init__(self, n_in: int, hidden: int, n_out: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std.clamp_min(1e-6))
        self.rnn = nn.GRU(n_in, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor, every_step: bool = False) -> torch.Tensor:
        h, _ = self.rnn((x - self.mean) / self.std)
        return self.head(h if every_step else h[:, -1])


def feature_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1, x.shape[-1])
    return flat.mean(0), flat.std(0)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, epochs: int, batch_size: int,
        lr: float, generator: torch.Generator, **forward_kw) -> nn.Module:
    """Plain Adam mini-batch training; x and y already on the model's device, batches drawn with `generator`."""
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            idx = idx.to(x.device)
            optim.zero_grad(set_to_none=True)
            loss_fn(model(x[idx], **forward_kw), y[idx]).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # lr is high for a short budget: no blow-ups
            optim.step()
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, **forward_kw) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size], **forward_kw) for i in range(0, len(x), batch_size)])


@contextmanager
def seeded(seed: int, device: torch.device):
    """A forked torch RNG seeded with `seed`: reproducible models, and the caller's RNG state (e.g. the GAN
    trainer's) is restored afterwards."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def as_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)


def discriminative_score(real: np.ndarray, fake: np.ndarray, seed: int, device: torch.device, epochs: int = 20,
                         hidden: int = 32, batch_size: int = 32, lr: float = 1e-2,
                         max_seq: int = 1000) -> dict[str, float]:
    """TimeGAN's discriminative score: a post-hoc 2-layer GRU learns real (1) vs synthetic (0) on 80 % of a
    balanced sample; score = |held-out accuracy - 0.5|. Small and quick, for the trainer's snapshots: it says
    its sample size (discriminative_n, per side); realism.py holds the scores that can tell."""
    rng = np.random.default_rng(seed)
    n = min(len(real), len(fake), max_seq)
    real, fake = subsample(real, n, rng)[rng.permutation(n)], subsample(fake, n, rng)[rng.permutation(n)]
    n_train = max(1, int(round(0.8 * n)))
    x_train = as_tensor(np.concatenate([real[:n_train], fake[:n_train]]), device)
    y_train = as_tensor(np.r_[np.ones(n_train), np.zeros(n_train)], device)[:, None]
    x_test = as_tensor(np.concatenate([real[n_train:], fake[n_train:]]), device)
    y_test = np.r_[np.ones(n - n_train), np.zeros(n - n_train)]
    with seeded(seed, device):
        model = PostHocGRU(real.shape[2], hidden, 1, *feature_stats(x_train)).to(device)
        fit(model, x_train, y_train, F.binary_cross_entropy_with_logits, epochs, batch_size, lr,
            torch.Generator().manual_seed(seed))
        guess = (predict(model, x_test)[:, 0] > 0).cpu().numpy()
    acc = float((guess == y_test).mean()) if len(y_test) else 0.5
    return {"discriminative_score": abs(acc - 0.5), "discriminative_accuracy": acc, "discriminative_n": float(n)}


def predictive_score(real: np.ndarray, fake: np.ndarray, seed: int, device: torch.device, epochs: int = 20,
                     hidden: int = 32, batch_size: int = 32, lr: float = 1e-2,
                     max_seq: int = 1000) -> dict[str, float]:
    """TimeGAN's predictive score (train on synthetic, test on real): a 2-layer GRU predicts every feature of
    step t+1 from steps 0..t; MAE on one half of the real sample. The same model trained on as many sequences
    of the other real half gives the train-on-real reference. predictive_n: the sequences each model trains on."""
    rng = np.random.default_rng(seed + 1)
    real = real[rng.permutation(len(real))]
    half = max(1, len(real) // 2)
    n_train = min(half, len(fake), max_seq)
    real_train, real_test = real[:n_train], (real[half:] if len(real) > 1 else real)[:max_seq]
    x_test = as_tensor(real_test, device)
    out = {}
    for key, train in (("predictive_mae", subsample(fake, n_train, rng)), ("predictive_mae_real", real_train)):
        x = as_tensor(train, device)
        with seeded(seed, device):
            model = PostHocGRU(real.shape[2], hidden, real.shape[2], *feature_stats(x)).to(device)
            fit(model, x[:, :-1], x[:, 1:], F.l1_loss, epochs, batch_size, lr, torch.Generator().manual_seed(seed),
                every_step=True)
            out[key] = float(F.l1_loss(predict(model, x_test[:, :-1], every_step=True), x_test[:, 1:]))
    out["predictive_n"] = float(n_train)
    return out


def soc_windows(x: np.ndarray, window: int) -> np.ndarray:
    """[n, T, F] -> [n * (T // window), window, F]: non-overlapping windows aligned to each sequence's end
    (stride = window, as the paper's SOC training data); the label is the SOC at each window's last step."""
    k = x.shape[1] // window
    return np.ascontiguousarray(x[:, x.shape[1] - k * window:]).reshape(-1, window, x.shape[2])


def soc_tstr(fake: np.ndarray, test_windows: np.ndarray, train_windows: np.ndarray | None, seed: int,
             device: torch.device, epochs: int = 20, hidden: int = 256, batch_size: int = 128, lr: float = 1e-3,
             max_windows: int = 4000, max_test: int | None = None) -> dict[str, float]:
    """Train on synthetic, test on real (TSTR) for the paper's downstream task: the paper's SOC LSTM
    (soc_estimator.SOCLSTM, Huber loss as the paper) learns V, I, T window -> SOC at the last step from the
    labelled synthetic windows; RMSE and MAE in SOC % on the real test cycles. With train_windows, the same model,
    window count and budget trained on real training windows gives the TRTR reference.
    The window is min(synthetic steps, test steps): the paper's 300 at full size; the test windows' last steps.
    The budget (epochs, batch 128, lr 1e-3) is far below the paper's (1000 epochs, batch 32, lr 1e-5): the
    numbers compare runs and TSTR with TRTR, not with the paper's estimator accuracy."""
    window = min(fake.shape[1], test_windows.shape[1])
    rng = np.random.default_rng(seed + 2)
    sets = {"tstr": soc_windows(fake, window)}
    if train_windows is not None:
        sets["trtr"] = soc_windows(train_windows, window)
    n_train = tstr_windows(fake, test_windows, train_windows, max_windows)
    test = subsample(test_windows[:, -window:], max_test or len(test_windows), rng)
    x_test, y_test = as_tensor(test[..., :3], device), test[:, -1, 3].astype(np.float64)
    out = {}
    for key, windows in sets.items():
        train = subsample(windows, n_train, rng)
        x, y = as_tensor(train[..., :3], device), as_tensor(train[:, -1, 3:4], device)
        with seeded(seed, device):
            model = SOCLSTM(n_features=3, hidden=hidden).to(device)
            fit(model, x, y, F.huber_loss, epochs, batch_size, lr, torch.Generator().manual_seed(seed))
            err = predict(model, x_test, batch_size=512)[:, 0].double().cpu().numpy() - y_test
        out[f"{key}_rmse_soc_pct"] = float(100 * np.sqrt(np.mean(err ** 2)))
        out[f"{key}_mae_soc_pct"] = float(100 * np.mean(np.abs(err)))
    return out


def tstr_windows(fake: np.ndarray, test_windows: np.ndarray, train_windows: np.ndarray | None,
                 max_windows: int = 4000) -> int:
    """The training windows soc_tstr gives each SOC LSTM: as many for TSTR as for TRTR, at most max_windows."""
    window = min(fake.shape[1], test_windows.shape[1])
    return min(max_windows, *(len(x) * (x.shape[1] // window) for x in (fake, train_windows) if x is not None))


def all_metrics(real: np.ndarray, fake: np.ndarray, scaler: dict | None, seed: int, device: torch.device | str,
                test_windows: np.ndarray | None = None, train_windows: np.ndarray | None = None,
                epochs: int = 20, hidden: int = 32, max_seq: int = 1000, tstr_epochs: int = 20,
                tstr_hidden: int = 256, tstr_batch_size: int = 128, tstr_max_windows: int = 4000,
                tstr_max_test: int | None = None) -> dict[str, float]:
    """quick_metrics + discriminative and predictive scores (post-hoc GRUs: `epochs`, `hidden`, at most `max_seq`
    sequences per set) + TSTR/TRTR SOC errors when test_windows (real [n, W, 4] test cycles) are given.
    train_windows: real training sequences [m, T, 4] for the TRTR reference (cut into windows here)."""
    device = torch.device(device)
    out = quick_metrics(real, fake, scaler, seed)
    out.update(discriminative_score(real, fake, seed, device, epochs=epochs, hidden=hidden, max_seq=max_seq))
    out.update(predictive_score(real, fake, seed, device, epochs=epochs, hidden=hidden, max_seq=max_seq))
    if test_windows is not None:
        out.update(soc_tstr(fake, test_windows, train_windows, seed, device, epochs=tstr_epochs, hidden=tstr_hidden,
                            batch_size=tstr_batch_size, max_windows=tstr_max_windows, max_test=tstr_max_test))
        out["tstr_n_windows"] = float(tstr_windows(fake, test_windows, train_windows, tstr_max_windows))
        out["tstr_n_test"] = float(min(tstr_max_test or len(test_windows), len(test_windows)))
    return out
