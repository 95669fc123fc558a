"""realism.py: the summary features by hand, the classifiers at chance on real against real and far above it on
real windows corrupted the ways a generator gets them wrong, the sample-size rules."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import realism
from common import UserError

ROOT = Path(__file__).resolve().parent.parent
SCALER = json.loads((ROOT / "data" / "lg_600_data.json").read_text())["scaler"]
L = 100   # the last 100 of the exported steps keep these tests fast


@pytest.fixture(scope="module")
def halves() -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random samples of 200 real training windows, steps 499..598 (the end of the exported steps)."""
    x = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")
    idx = np.random.default_rng(0).permutation(len(x))[:400]
    return (np.ascontiguousarray(x[np.sort(idx[:200]), -L - 1:-1]),
            np.ascontiguousarray(x[np.sort(idx[200:]), -L - 1:-1]))


def smoothed_current(x: np.ndarray, width: int = 10) -> np.ndarray:
    """The current as a moving average over `width` steps: a glide where the real demand is held and jumps."""
    out = x.copy()
    kernel = np.ones(width) / width
    out[..., 1] = np.stack([np.convolve(np.pad(s, (width - 1, 0), mode="edge"), kernel, "valid") for s in x[..., 1]])
    return out


def continuous_temperature(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The temperature off the sensor's 0.105 degC grid: a small continuous noise on every step."""
    out = x.copy()
    out[..., 2] += rng.normal(0, 0.02 / (SCALER["max"][2] - SCALER["min"][2]), out[..., 2].shape)
    return out


def test_features_by_hand():
    n_steps = 60
    i = np.zeros((2, n_steps))
    i[:, 30:] = -2.0                                   # a held demand with one jump
    i[1] += 0.001 * np.arange(n_steps)                 # the second also glides
    v = 3.7 + 0.03 * i                                 # a 30 mOhm cell, no other voltage movement
    t = np.full((2, n_steps), 25.0)
    t[0, 45:] = 25.105                                 # one temperature quantum
    x = np.stack([v, i, t], axis=2)
    f = dict(zip(realism.feature_names(), realism.window_features(x).T))
    assert len(realism.feature_names()) == realism.window_features(x).shape[1] == 53
    assert f["I_step_changed_share"][0] == pytest.approx(1 / (n_steps - 1))
    assert f["I_step_changed_share"][1] == pytest.approx(1.0)
    assert f["I_step_mean_abs"][0] == pytest.approx(2 / (n_steps - 1))
    assert f["I_step_p99_abs"][0] == pytest.approx(np.percentile(np.abs(np.diff(i[0])), 99))
    d = np.diff(i[0])
    assert f["I_step_std_over_mean_abs"][0] == pytest.approx(d.std() / np.abs(d).mean())
    assert f["I_step_kurtosis"][0] == pytest.approx(((d - d.mean()) ** 4).mean() / d.var() ** 2)
    assert f["resistance"] == pytest.approx([0.03, 0.03]) and f["resistance_residual_std"] == pytest.approx(0, abs=1e-9)
    assert f["T_step_changed_share"][0] == pytest.approx(1 / (n_steps - 1)) and f["T_step_changed_share"][1] == 0
    assert f["T_acf_lag1"][1] == 0 and f["T_step_kurtosis"][1] == 0   # a flat channel: no memory, no tail
    assert f["I_mean"][0] == pytest.approx(-1.0) and f["I_q50"][0] == pytest.approx(-1.0)
    assert f["V_range"][0] == pytest.approx(0.06) and f["I_acf_lag50"][0] < f["I_acf_lag1"][0]
    ramp = np.linspace(0, 1, n_steps)
    acf1 = ((ramp[:-1] - ramp.mean()) * (ramp[1:] - ramp.mean())).sum() / ((ramp - ramp.mean()) ** 2).sum()
    ramp_x = np.stack([ramp, ramp, ramp], axis=1)[None]
    assert realism.window_features(ramp_x)[0, realism.feature_names().index("V_acf_lag1")] == pytest.approx(acf1)


def test_features_in_physical_units(halves):
    real = halves[0][:5]
    f = dict(zip(realism.feature_names(), realism.window_features(real, SCALER).T))
    volts = real[..., 0].astype(np.float64) * (SCALER["max"][0] - SCALER["min"][0]) + SCALER["min"][0]
    assert f["V_mean"] == pytest.approx(volts.mean(1))
    assert np.all((f["resistance"] > 0.005) & (f["resistance"] < 0.2))   # ohm: tens of mOhm
    scaled = dict(zip(realism.feature_names(), realism.window_features(real).T))
    assert scaled["I_step_changed_share"] == pytest.approx(f["I_step_changed_share"])   # a share: unit-free
    bad = real.copy()
    bad[0, 3, 1] = np.nan
    assert np.isnan(realism.window_features(bad, SCALER)[0]).any() and np.isfinite(realism.window_features(bad)[1]).all()


def test_gbt_is_at_chance_on_real_and_tells_corrupted_real(halves):
    a, b = halves
    rng = np.random.default_rng(1)
    floor = realism.gbt_score(a, b, seed=0, scaler=SCALER)
    assert floor["score"] <= 0.1                      # 400 windows held out over the folds: 4 standard errors
    assert floor["score"] == pytest.approx(abs(floor["accuracy"] - 0.5))
    corrupted = {"smoothed current": smoothed_current(b), "shuffled steps": b[:, rng.permutation(L)],
                 "continuous temperature": continuous_temperature(b, rng)}
    for name, x in corrupted.items():
        r = realism.gbt_score(a, x, seed=0, scaler=SCALER)
        assert r["score"] >= 0.3, name
        assert len(r["top_features"]) == 5 and r["top_features"][0][1] >= r["top_features"][-1][1]
    told = realism.gbt_score(a, corrupted["continuous temperature"], seed=0, scaler=SCALER)["top_features"]
    assert told[0][0].startswith("T_step"), told     # what tells it apart is named
    levels = realism.gbt_score(a, corrupted["shuffled steps"], seed=0, scaler=SCALER, top=3,
                               features=realism.level_features())
    assert levels["score"] <= 0.1                    # a shuffle keeps every level: told by the dynamics alone
    assert len(levels["top_features"]) == 3 and all(n in realism.level_features() for n, _ in levels["top_features"])


def test_gru_tells_shuffled_steps_stops_early_and_is_reproducible(halves):
    a, b = halves
    shuffled = b[:, np.random.default_rng(1).permutation(L)]
    kw = dict(seed=3, hidden=16, max_epochs=15, patience=5, batch_size=16, lr=1e-2)
    r = realism.gru_score(a, shuffled, **kw)
    assert r["score"] >= 0.3 and r["n_test"] == 120 and r["n_train"] + r["n_val"] == 280
    floor = realism.gru_score(a, b, **kw)
    assert floor["score"] <= 0.15 and 1 <= floor["best_epoch"] <= floor["epochs_run"] - kw["patience"]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    short = dict(kw, max_epochs=2)
    first = realism.gru_score(a[:40], shuffled[:40], **short)
    assert torch.equal(torch.get_rng_state(), before)   # the caller's RNG is left alone
    assert realism.gru_score(a[:40], shuffled[:40], **short) == first


def test_realism_scores_sample_size_rules(halves):
    a, b = halves
    real = np.concatenate([a, b])
    r = realism.realism_scores(real, b[:60], seed=0, scaler=SCALER, gru=False)
    assert r["n_per_side"] == 60 and r["small_sample"] and r["watch_only"] and "gru" not in r
    assert "for watching only" in realism.describe(r) and "n = 60 per side" in realism.describe(r)
    assert set(realism.flat(r)) == {"realism_n_per_side", "realism_gbt_score", "realism_gbt_floor"}
    assert realism.sample_size(len(real), 5000) == 200   # the floor needs two disjoint real samples
    assert realism.sample_size(5000, 3000) == 1000       # the protocol's 1000 per side at most
    with pytest.raises(UserError, match="too few"):
        realism.sample_size(len(real), 9)
    with pytest.raises(ValueError, match="same steps"):
        realism.realism_scores(real, b[:, :50], gru=False)


def test_describe_names_only_the_features_that_tell_and_every_flat_key_is_documented():
    scored = {"score": 0.5, "accuracy": 1.0, "top_features": [["T_step_changed_share", 0.38], ["V_mean", 0.0]]}
    floor = {"score": 0.01, "accuracy": 0.51, "top_features": [["V_mean", 0.0]]}
    result = {"n_per_side": 1000, "small_sample": False, "watch_only": False, "gbt": scored, "gbt_floor": floor,
              "gru": {"score": 0.4, "accuracy": 0.9}, "gru_floor": {"score": 0.02, "accuracy": 0.52}}
    text = realism.describe(result)
    assert "telling most: T_step_changed_share 0.380\n" in text and "V_mean" not in text
    assert "small sample" not in text and "watching" not in text   # 1000 per side: the protocol's size
    assert set(realism.flat(result)) == set(realism.METRIC_DOCS)
    floor_only = dict(result, gbt=floor)
    assert "telling most: none" in realism.describe(floor_only)
