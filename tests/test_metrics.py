"""metrics.py: the metrics tell real data held out of the same set from obviously bad synthetic data
(time steps shuffled, constant sequences), physics checks by hand, reproducibility, speed."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import metrics

ROOT = Path(__file__).resolve().parent.parent
SCALER = {"min": [2.79268, -18.09828, -0.84127], "max": [4.2399, 6.00472, 26.28963]}   # data/lg_600_data.json
CPU = torch.device("cpu")
L = 50   # steps per sequence in these tests: the last 50 of the 600 (as the GAN's evaluation, steps T-L-1..T-2)


@pytest.fixture(scope="module")
def sets() -> dict[str, np.ndarray]:
    """Two disjoint random halves of the real training windows, and bad 'synthetic' data made from the second."""
    x = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))[:300]
    real = np.ascontiguousarray(x[np.sort(idx[:150]), -L - 1:-1])
    held = np.ascontiguousarray(x[np.sort(idx[150:]), -L - 1:-1])
    return {
        "real": real,
        "held_out": held,
        "shuffled": np.stack([s[rng.permutation(L)] for s in held]),             # same values, no time order
        "seq_constant": np.repeat(held.mean(axis=1, keepdims=True), L, axis=1),  # each sequence flat at its mean
        "constant": np.broadcast_to(held.mean(axis=(0, 1)), held.shape).copy(),  # one flat sequence for all
    }


# ---- quick metrics ------------------------------------------------------------------------------------------

def test_quick_metrics_separate_bad_from_held_out_real(sets):
    real = sets["real"]
    q = {name: metrics.quick_metrics(real, sets[name], SCALER, seed=0)
         for name in ("held_out", "shuffled", "seq_constant", "constant")}
    good = q["held_out"]
    # marginals: a shuffle keeps them exactly, one constant for all sequences does not
    assert q["shuffled"]["w1_mean"] == pytest.approx(good["w1_mean"], abs=1e-9)
    assert q["constant"]["w1_mean"] > 4 * good["w1_mean"]
    # time structure: every bad set loses the autocorrelation and the step-to-step dynamics
    assert good["acf_diff_mean"] < 0.03 and abs(good["mmd2_rbf_diff"]) < 0.02
    for bad in ("shuffled", "seq_constant", "constant"):
        assert q[bad]["acf_diff_mean"] > 0.1, bad
        assert q[bad]["mmd2_rbf_diff"] > 0.05, bad
    assert q["constant"]["mmd2_rbf_flat"] > 0.1 > 0.02 > abs(good["mmd2_rbf_flat"])
    # physics: real data are (nearly) clean; a shuffle makes SOC rise while discharging
    assert good["phys_soc_rise_while_discharging"] == 0.0 == good["real_phys_soc_rise_while_discharging"]
    assert good["phys_v_out_of_limits"] < 0.001 and good["phys_t_out_of_range"] == 0.0
    assert q["shuffled"]["phys_soc_rise_while_discharging"] > 0.2
    assert all(isinstance(v, float) for v in good.values())
    assert good["nonfinite_share"] == 0.0


def test_quick_metrics_without_scaler_has_no_physics_and_rejects_mismatched_steps(sets):
    q = metrics.quick_metrics(sets["real"], sets["held_out"], None, seed=0)
    assert not any(k.startswith(("phys_", "real_phys_")) for k in q)
    with pytest.raises(ValueError, match="same steps"):
        metrics.quick_metrics(sets["real"], sets["held_out"][:, :-1], None, seed=0)


def test_quick_metrics_report_diverged_output_instead_of_crashing(sets):
    fake = sets["held_out"].copy()
    fake[:15] = np.nan   # a tenth of the sequences diverged
    with np.errstate(invalid="ignore"):
        q = metrics.quick_metrics(sets["real"], fake, SCALER, seed=0)
    assert q["nonfinite_share"] == pytest.approx(0.1)


def test_quick_metrics_are_reproducible_at_the_papers_size():
    # ~1.3 s on a loaded 2-core machine (not asserted: speed belongs to bench.py and the docs)
    rng = np.random.default_rng(1)
    real = rng.random((4000, 300, 4), dtype=np.float32)
    fake = rng.random((4000, 300, 4), dtype=np.float32)
    first = metrics.quick_metrics(real, fake, SCALER, seed=3)
    assert metrics.quick_metrics(real, fake, SCALER, seed=3) == first


def test_physics_sanity_by_hand():
    lo, hi = np.array(SCALER["min"]), np.array(SCALER["max"])
    phys = np.zeros((1, 4, 4))
    phys[0, :, 0] = [3.7, 4.3, 2.4, 3.6]        # two of four voltages outside 2.5..4.2 V
    phys[0, :, 1] = [-1.0, -1.0, 2.0, -1.0]     # discharging at steps 1 and 3 (step 2 charges)
    phys[0, :, 2] = [20.0, 40.0, -6.0, 31.0]    # 40 > 26.29 + 5 and -6 < -0.84 - 5: two of four
    phys[0, :, 3] = [0.5, 0.6, 0.7, 1.2]        # SOC rises at steps 1 (discharging), 2 (charging), 3 (disch.)
    x = phys.copy()
    x[..., :3] = (phys[..., :3] - lo) / (hi - lo)
    p = metrics.physics_sanity(x, SCALER)
    assert p["phys_v_out_of_limits"] == pytest.approx(0.5)
    assert p["phys_t_out_of_range"] == pytest.approx(0.5)
    assert p["phys_soc_out_of_range"] == pytest.approx(0.25)
    assert p["phys_soc_rise_while_discharging"] == pytest.approx(1.0)   # both discharging steps rise


def test_voltage_residual_is_what_the_current_does_not_explain(sets):
    rng = np.random.default_rng(0)
    i = rng.normal(-2, 3, (3, 40))
    v = 3.7 + 0.03 * i                          # a pure resistance: nothing left
    assert metrics.resistance_line(v, i)[1].std(1) == pytest.approx(0, abs=1e-12)
    wobble = 0.01 * np.sin(np.arange(40) / 5)   # voltage moving on its own, 10 mV amplitude
    assert metrics.resistance_line(v + wobble, i)[1].std(1) == pytest.approx(wobble.std(), rel=0.2)
    # real windows: a few mV; the same with 30 mV of voltage noise added (scaled units) is far above
    real = sets["held_out"]
    noisy = real.copy()
    noisy[..., 0] += rng.normal(0, 0.03 / (SCALER["max"][0] - SCALER["min"][0]), noisy.shape[:2])
    clean, bad = (metrics.physics_sanity(x, SCALER)["phys_v_residual_mv"] for x in (real, noisy))
    assert 1 < clean < 12 and bad > clean + 15


def test_resistance_is_the_slope_of_voltage_in_current(sets):
    rng = np.random.default_rng(1)
    i = rng.normal(-2, 3, (3, 40))
    v = 3.7 + 0.03 * i + 0.002 * rng.normal(size=i.shape)   # 30 mOhm and 2 mV of noise
    slope, residual = metrics.resistance_line(v, i)
    assert slope == pytest.approx(0.03, abs=1e-3)
    assert residual.std(1) == pytest.approx(0.002, rel=0.3)   # what is left is the noise
    # real LG windows: tens of mOhm (an 18650 at 0..25 degC); the voltage swinging twice as far with the current
    # doubles it, while the residual stays
    real = sets["held_out"]
    span = SCALER["max"][0] - SCALER["min"][0], SCALER["max"][1] - SCALER["min"][1]
    i_scaled = real[..., 1] - real[..., 1].mean(1, keepdims=True)
    swung = real.copy()
    swung[..., 0] += i_scaled * span[1] / span[0] * metrics.resistance_line(
        real[..., 0] * span[0], real[..., 1] * span[1])[0][:, None]
    clean, doubled = (metrics.physics_sanity(x, SCALER) for x in (real, swung))
    assert 10 < clean["phys_resistance_mohm"] < 80
    assert doubled["phys_resistance_mohm"] == pytest.approx(2 * clean["phys_resistance_mohm"], rel=1e-6)
    assert doubled["phys_v_residual_mv"] == pytest.approx(clean["phys_v_residual_mv"], rel=1e-6)


def test_autocorrelation_by_hand():
    t = np.arange(200)
    x = np.stack([np.cos(2 * np.pi * t / 20), np.ones(200)], axis=1)[None]   # period 20 steps; constant
    acf = metrics.autocorrelation(x, max_lag=20)
    assert acf.shape == (2, 20)
    assert acf[0, 9] < -0.8 and acf[0, 19] > 0.8   # anti-phase at lag 10, in phase at lag 20 (tapered)
    assert np.all(acf[1] == 0)                     # constant: no defined ACF, counted as 0


def test_soc_windows_are_aligned_to_the_sequence_end():
    x = np.arange(2 * 7 * 1, dtype=float).reshape(2, 7, 1)
    w = metrics.soc_windows(x, 3)
    assert w.shape == (4, 3, 1)
    assert w[:, -1, 0].tolist() == [3, 6, 10, 13]   # the last step of each sequence is a window's label


# ---- post-hoc models ----------------------------------------------------------------------------------------

def test_discriminative_score_near_zero_for_real_and_high_for_bad(sets):
    kw = dict(seed=0, device=CPU, epochs=20, hidden=32)
    good = metrics.discriminative_score(sets["real"], sets["held_out"], **kw)
    assert good["discriminative_score"] <= 0.15
    assert good["discriminative_score"] == pytest.approx(abs(good["discriminative_accuracy"] - 0.5))
    assert good["discriminative_n"] == 150.0   # it says its sample size (per side)
    assert metrics.discriminative_score(sets["real"], sets["held_out"][:40], **kw)["discriminative_n"] == 40.0
    for bad in ("shuffled", "constant"):
        assert metrics.discriminative_score(sets["real"], sets[bad], **kw)["discriminative_score"] >= 0.3, bad


def test_predictive_score_is_worse_when_trained_on_constant_sequences(sets):
    kw = dict(seed=0, device=CPU, epochs=10, hidden=16)
    good = metrics.predictive_score(sets["real"], sets["held_out"], **kw)
    bad = metrics.predictive_score(sets["real"], sets["constant"], **kw)
    assert good["predictive_mae"] < 1.5 * good["predictive_mae_real"]   # real-trained: near the real reference
    assert bad["predictive_mae"] > 2 * good["predictive_mae"]
    assert bad["predictive_mae_real"] == good["predictive_mae_real"]   # the reference does not see the fake set


def test_post_hoc_models_are_reproducible_and_leave_the_global_rng_alone(sets):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = metrics.discriminative_score(sets["real"], sets["shuffled"], seed=5, device=CPU, epochs=2, hidden=8)
    assert torch.equal(torch.get_rng_state(), before)
    assert metrics.discriminative_score(sets["real"], sets["shuffled"], seed=5, device=CPU, epochs=2,
                                        hidden=8) == first


def test_tstr_trains_the_papers_soc_network_and_penalises_constant_data(sets):
    test_windows = np.load(ROOT / "data" / "lg_test_300_data.npy", mmap_mode="r")[::20]   # 147 real test windows
    train = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")[::20]
    kw = dict(seed=0, device=CPU, epochs=4, hidden=16, batch_size=32, lr=1e-2)
    good = metrics.soc_tstr(sets["held_out"], test_windows, train, **kw)
    assert set(good) == {"tstr_rmse_soc_pct", "tstr_mae_soc_pct", "trtr_rmse_soc_pct", "trtr_mae_soc_pct"}
    assert 0 < good["tstr_mae_soc_pct"] <= good["tstr_rmse_soc_pct"] < 100
    bad = metrics.soc_tstr(sets["constant"], test_windows, None, **kw)
    assert set(bad) == {"tstr_rmse_soc_pct", "tstr_mae_soc_pct"}   # no TRTR without real training windows
    assert bad["tstr_rmse_soc_pct"] > good["tstr_rmse_soc_pct"]


def test_all_metrics_is_flat_and_holds_every_family(sets):
    test_windows = np.load(ROOT / "data" / "lg_test_300_data.npy", mmap_mode="r")[::100]
    small = {k: v[:40] for k, v in sets.items()}
    m = metrics.all_metrics(small["real"], small["held_out"], SCALER, seed=1, device="cpu",
                            test_windows=test_windows, train_windows=small["real"], epochs=1, hidden=8,
                            tstr_epochs=1, tstr_hidden=8)
    for key in ("w1_V", "acf_diff_mean", "mmd2_rbf_flat", "mmd2_rbf_diff", "phys_soc_rise_while_discharging",
                "discriminative_score", "predictive_mae", "predictive_mae_real", "tstr_rmse_soc_pct",
                "trtr_mae_soc_pct"):
        assert key in m, key
    assert all(isinstance(v, float) and np.isfinite(v) for v in m.values())


# ---- charge counting ---------------------------------------------------------------------------------------------

def test_coulomb_check_passes_real_windows_and_fails_wrong_labels():
    windows = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")[::20].astype(np.float64)
    scaler = json.loads((ROOT / "data" / "lg_600_data.json").read_text())["scaler"]
    assert set(scaler["capacity_ah"]) == {"0degC", "10degC", "25degC"}
    real = metrics.coulomb_gap(windows, scaler)
    assert real.max() < 0.1   # the real SOC is the coulomb count: a few thousandths of a percent
    # the current of another window: a different charge left the cell. Over 60 s that is well under 1 % SOC (a
    # drive cycle moves SOC by ~1 % a minute), so it shows at the true labels' precision, not at the tolerance
    # meant for estimator labels
    other_current = windows.copy()
    other_current[:, :, 1] = windows[np.random.default_rng(0).permutation(len(windows)), :, 1]
    assert (metrics.coulomb_gap(other_current, scaler) > 0.1).mean() > 0.9
    # SOC shifted by 5 % halfway through the window: labels no charge explains
    shifted = windows.copy()
    shifted[:, 300:, 3] += 0.05
    assert (metrics.coulomb_gap(shifted, scaler) > metrics.COULOMB_TOL_PCT).all()
    quick = metrics.quick_metrics(windows[:40], windows[40:80], scaler, 0)
    assert quick["soc_coulomb_error"] < 0.1 and quick["soc_coulomb_fail_share"] == 0
    assert quick["real_soc_coulomb_fail_share"] == 0


def test_coulomb_capacity_follows_the_sequence_temperature():
    scaler = {"min": [0.0, -10.0, 0.0], "max": [1.0, 10.0, 25.0], "capacity_ah": {"0degC": 2.0, "25degC": 4.0}}
    x = np.zeros((2, 11, 4))
    x[:, :, 1] = 0.5 - 3.6 / 20   # -3.6 A scaled: 0.1 mAh per 0.1 s step
    x[0, :, 2], x[1, :, 2] = 0.0, 1.0   # 0 degC (Q = 2 Ah) and 25 degC (Q = 4 Ah)
    for k, q in enumerate((2.0, 4.0)):
        x[k, :, 3] = 0.5 - np.arange(11) * 0.0001 / q   # exactly the counted charge
    np.testing.assert_allclose(metrics.coulomb_gap(x, scaler), 0, atol=1e-9)
    x[1, :, 3] = x[0, :, 3]   # 25 degC sequence labelled as if Q were 2 Ah: off by half the drop
    gap = metrics.coulomb_gap(x, scaler)
    assert gap[0] < 1e-9 and gap[1] == pytest.approx(np.mean(np.arange(1, 11) * 0.0001 / 4) * 100)


def test_coulomb_gap_is_the_labellers_charge_count_and_unchanged():
    """metrics.coulomb_gap counts charge with soc_estimator.counted_soc (one count in the project), and gives what
    its own count gave before, bit for bit, on real windows."""
    from soc_estimator import counted_soc
    windows = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")[::40, :200].astype(np.float32)
    scaler = json.loads((ROOT / "data" / "lg_600_data.json").read_text())["scaler"]
    gap = metrics.coulomb_gap(windows, scaler)
    soc = windows[..., 3].astype(np.float64)
    assert np.array_equal(gap, np.abs(soc[:, 1:] - soc[:, :1] - counted_soc(windows, scaler)[:, 1:]).mean(1) * 100)
    # the count metrics.py had of its own before (commit c2dc250)
    lo, hi = np.asarray(scaler["min"], np.float64), np.asarray(scaler["max"], np.float64)
    current = windows[..., 1].astype(np.float64) * (hi[1] - lo[1]) + lo[1]
    temp = windows[..., 2].astype(np.float64).mean(1) * (hi[2] - lo[2]) + lo[2]
    classes = {float(k.removesuffix("degC")): q for k, q in scaler["capacity_ah"].items()}
    centres = np.array(sorted(classes))
    q = np.array([classes[c] for c in centres])[np.abs(temp[:, None] - centres).argmin(1)]
    counted = np.cumsum(current[:, :-1] * 0.1, axis=1) / (3600.0 * q[:, None])
    assert np.array_equal(gap, np.abs(soc[:, 1:] - soc[:, :1] - counted).mean(1) * 100)


def test_quick_metrics_work_with_fused_labels(soc_model):
    """Real V, I, T with fused labels (a random-weight estimator's level: whatever the readings): the quick metrics
    come out finite, with no coulomb gap and no SOC rising while the current discharges."""
    from soc_estimator import SOCEstimator
    windows = np.ascontiguousarray(np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")[::100][:20, :60])
    scaler = json.loads((ROOT / "data" / "lg_600_data.json").read_text())["scaler"]
    fused = windows.copy()
    fused[..., 3], _ = SOCEstimator.load(soc_model).fused_labels(windows[..., :3], scaler, window=20)
    quick = metrics.quick_metrics(windows, fused, scaler, seed=0)
    assert all(np.isfinite(v) for v in quick.values())
    assert quick["soc_coulomb_error"] < 1e-4 and quick["soc_coulomb_fail_share"] == 0
    assert quick["phys_soc_rise_while_discharging"] == 0
    assert quick["w1_V"] == quick["w1_I"] == quick["w1_T"] == 0 < quick["w1_SOC"]   # only the labels differ


def test_class_temperature_gap_and_match_by_hand():
    """Three classes at scaled temperatures 0.1, 0.4, 0.9 (a 30 degC range): class 0's synthetic sequences at
    their own level match it, at 25 degC's level they match nothing of class 0 and are 24 degC off."""
    rng = np.random.default_rng(0)
    levels = np.repeat([0.1, 0.4, 0.9], 6)
    real = rng.uniform(0, 1, (18, 20, 4))
    real[:, :, 2] = levels[:, None] + rng.normal(0, 0.01, (18, 20))
    real_classes = np.repeat([0, 1, 2], 6)
    scaler = {"min": [0, 0, -5.0], "max": [1, 1, 25.0]}
    own = real[:6].copy()
    wrong = real[12:].copy()
    good = metrics.class_temperature(real, real_classes, own, 0, scaler)
    assert good["class_match"] == 1 and good["real_class_match"] == 1 and abs(good["t_mean_gap"]) < 1e-9
    bad = metrics.class_temperature(real, real_classes, wrong, 0, scaler)
    assert bad["class_match"] == 0 and bad["t_mean_gap"] == pytest.approx(0.8 * 30, abs=0.3)
    half = metrics.class_temperature(real, real_classes, np.concatenate([own[:3], wrong[:3]]), 0, None)
    assert half["class_match"] == 0.5 and half["t_mean_gap"] == pytest.approx(0.4, abs=0.01)
    # per_class carries them for each class with enough sequences; the split by nearest class leaves them out
    values = metrics.per_class(real, real_classes, np.concatenate([own, wrong]), np.repeat([0, 2], 6),
                               ["0degC", "10degC", "25degC"], scaler, 0)
    assert values["0degC/class_match"] == 1 and values["25degC/class_match"] == 1 and "10degC/w1_T" not in values
    plain = metrics.per_class(real, real_classes, own, np.zeros(6, int), ["0degC", "10degC", "25degC"], scaler, 0,
                              temperature=False)
    assert "0degC/w1_T" in plain and "0degC/class_match" not in plain
