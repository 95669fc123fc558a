"""Fused SOC labels (issue 40): the estimator's level plus charge counting, on real windows; the command line."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import soc_estimator as se
from soc_estimator import SOCEstimator, SOCModelError, counted_soc, reading_steps, sequence_capacity_ah

ROOT = Path(__file__).resolve().parent.parent
SIDECAR = ROOT / "data" / "lg_600_data.json"
META = json.loads(SIDECAR.read_text())
SCALER = META["scaler"]
SHIPPED = ROOT / "soc_models" / "lg_positive_temp_300_steps.h5"


def real_windows(rows, steps: int = 600) -> np.ndarray:
    """Real training windows (V, I, T, SOC) from the shipped data."""
    return np.asarray(np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")[rows, :steps], np.float32)


def one_per_temperature(offset: int) -> list[int]:
    """One window of each temperature's first file, `offset` windows in."""
    return [next(e["start"] for e in META["file_index"] if e["temp"] == t) + offset for t in SCALER["capacity_ah"]]


# -----------------------------------------------------------------------------
# charge counting

def test_capacity_of_the_nearest_temperature_class():
    for entry in META["file_index"][::3]:
        x = real_windows(slice(entry["start"], entry["start"] + 5), 50)
        assert (sequence_capacity_ah(x, SCALER) == SCALER["capacity_ah"][entry["temp"]]).all()
    x = real_windows([0, 1], 50)
    x[1, 5, 2] = np.nan
    q = sequence_capacity_ah(x, SCALER)
    assert np.isfinite(q[0]) and np.isnan(q[1])


def test_counted_charge_is_the_real_soc_change():
    x = real_windows(slice(0, 2030, 50)).astype(np.float64)
    counted = counted_soc(x, SCALER)
    assert counted.shape == x.shape[:2] and (counted[:, 0] == 0).all()
    gap = x[..., 3] - x[:, :1, 3] - counted   # the data's SOC is the cycler's own charge count
    assert np.abs(gap).max() < 2e-3 and np.abs(gap).mean() < 1e-4
    # one step by hand: 1 A of discharge for 0.1 s out of Q Ah
    lo, hi = SCALER["min"][1], SCALER["max"][1]
    y = x[:1, :3].copy()
    y[..., 1] = (-1.0 - lo) / (hi - lo)
    q = sequence_capacity_ah(y, SCALER)[0]
    np.testing.assert_allclose(counted_soc(y, SCALER)[0], [0, -0.1 / 3600 / q, -0.2 / 3600 / q], rtol=1e-9)


def test_reading_steps_are_evenly_spaced_over_the_labellable_steps():
    assert reading_steps(600, 300, 3).tolist() == [299, 449, 599]
    assert reading_steps(600, 300, 301).tolist() == list(range(299, 600))
    assert reading_steps(600, 300, 1000).tolist() == list(range(299, 600))   # no step read twice
    assert reading_steps(300, 300, 3).tolist() == [299]
    with pytest.raises(SOCModelError):
        reading_steps(600, 300, 0)


# -----------------------------------------------------------------------------
# the labeller (random-weight network on real windows: the arithmetic, whatever the readings)

@pytest.fixture(scope="module")
def random_est(soc_model) -> SOCEstimator:
    return SOCEstimator.load(soc_model)


def test_fused_labels_follow_charge_counting_on_real_windows(random_est):
    x = real_windows(slice(3, 2030, 400), 80)[..., :3]
    soc, spread = random_est.fused_labels(x, SCALER, window=20, readings=5)
    assert soc.shape == (len(x), 80) and soc.dtype == np.float32 and spread.shape == (len(x),)
    counted = counted_soc(x, SCALER)
    # the label's change from step to step is the counted charge, to float32 precision (labels near 1: ulp 6e-8)
    np.testing.assert_allclose(np.diff(soc, axis=1), np.diff(counted, axis=1), rtol=0, atol=2.5e-7)
    # its level: the median over the readings of (reading - charge counted to the reading's step)
    steps = reading_steps(80, 20, 5)
    readings = random_est.label(x, 20)[:, steps - 19].astype(np.float64)
    level = readings - counted[:, steps]
    s0 = np.median(level, 1)
    # (the readings come in other batches than label()'s, which moves the network's output by float rounding)
    np.testing.assert_allclose(soc, s0[:, None] + counted, rtol=0, atol=2e-6)
    np.testing.assert_allclose(spread, np.sqrt(np.mean((level - s0[:, None]) ** 2, 1)), rtol=0, atol=2e-6)
    assert (spread > 0).all()   # a random network's readings disagree with the charge count


def test_non_finite_rows_get_nan_labels_not_an_error(random_est):
    x = real_windows([5, 700, 1500], 40)[..., :3]
    bad = x.copy()
    bad[1, 30, 0] = np.nan
    bad[2, 0, 1] = np.inf
    soc, spread = random_est.fused_labels(bad, SCALER, window=10)
    assert np.isnan(soc[1:]).all() and np.isnan(spread[1:]).all()
    alone, alone_spread = random_est.fused_labels(x[:1], SCALER, window=10)
    assert np.array_equal(soc[:1], alone) and np.array_equal(spread[:1], alone_spread)
    soc, spread = random_est.fused_labels(bad[1:], SCALER, window=10)   # every row bad: all NaN
    assert soc.shape == (2, 40) and np.isnan(soc).all() and np.isnan(spread).all()
    for seq, window in [(x[..., :2], 10), (x, 41), (x[0], 10)]:   # shapes stay errors
        with pytest.raises(SOCModelError):
            random_est.fused_labels(seq, SCALER, window=window)


def test_sampling_labels_either_way_over_any_kept_steps(random_est):
    """sampling.label, the trainer's and generate.py's labelling: 'estimator' gives label()'s columns of the kept
    steps and no spread; 'fused' gives fused_labels()' columns and spread, also past one chunk of sequences (256 on
    a CPU) and with a diverged (NaN) sequence among them."""
    import sampling
    x = np.ascontiguousarray(real_windows(slice(0, 2030, 7), 12)[..., :3])   # 290 sequences of 12 steps
    x[100, 3, 1] = np.nan
    out, spread = sampling.label(random_est, x, 4, 0, 12, labels="fused", scaler=SCALER)
    assert out.shape == (290, 12, 4) and spread.shape == (290,)
    assert np.isnan(out[100, :, 3]).all() and np.isnan(spread[100])
    good = np.delete(np.arange(290), 100)
    soc, expected = random_est.fused_labels(x[good], SCALER, window=4)
    np.testing.assert_allclose(out[good, :, 3], soc, rtol=0, atol=2e-6)   # other batches: float rounding
    np.testing.assert_allclose(spread[good], expected, rtol=0, atol=2e-6)
    assert np.array_equal(out[..., :3], x, equal_nan=True)
    part, _ = sampling.label(random_est, x[:5], 4, 5, 6, labels="fused", scaler=SCALER)
    np.testing.assert_allclose(part, out[:5, 5:11], rtol=0, atol=2e-6)   # the kept steps: a slice of every step's
    est, none = sampling.label(random_est, x[:5], 4, 5, 6)
    assert none is None and np.array_equal(est[..., 3], random_est.label(x[:5], 4, batch_size=256)[:, 2:8])
    with pytest.raises(ValueError):   # the estimator has no label before its first window ends
        sampling.label(random_est, x[:5], 4, 0, 6)


def test_fused_labels_need_the_capacity(tmp_path):
    import sampling
    from common import UserError
    sampling.check_labels("estimator", None, "config.json")   # the paper's labels need no scaler
    sampling.check_labels("fused", SCALER, "config.json")
    for scaler in (None, {k: v for k, v in SCALER.items() if k != "capacity_ah"}, {**SCALER, "capacity_ah": {"x": 1}}):
        with pytest.raises(UserError, match="config.json"):
            sampling.check_labels("fused", scaler, "config.json")


# -----------------------------------------------------------------------------
# the shipped estimator on real windows: closer to the true SOC, unmoved by a voltage glitch

@pytest.fixture(scope="module")
def shipped() -> tuple[SOCEstimator, np.ndarray, np.ndarray]:
    """The shipped estimator, three real 600-step windows (one per temperature) and their per-step labels."""
    est = SOCEstimator.load(SHIPPED)
    x = real_windows(one_per_temperature(40))
    return est, x, est.label(x[..., :3], 300)


def test_fused_labels_are_closer_to_the_true_soc_than_per_step_labels(shipped):
    est, x, per_step = shipped
    soc, spread = est.fused_labels(x[..., :3], SCALER)
    true = x[..., 3]
    fused_rmse = np.sqrt(np.mean((soc[:, 299:] - true[:, 299:]) ** 2))
    est_rmse = np.sqrt(np.mean((per_step - true[:, 299:]) ** 2))
    assert fused_rmse < est_rmse
    assert np.sqrt(np.mean((soc - true) ** 2)) < 0.03   # every step, the first 299 too
    assert (spread < 0.03).all()


def test_a_voltage_jump_moves_per_step_labels_not_fused_ones(shipped):
    est, x, per_step = shipped
    clean, _ = est.fused_labels(x[:1, :, :3], SCALER)
    jumped = x[:1, :, :3].copy()
    jumped[0, 290:310, 0] += 0.050 / (SCALER["max"][0] - SCALER["min"][0])   # +50 mV on 20 steps
    fused, _ = est.fused_labels(jumped, SCALER)
    moved_per_step = np.abs(est.label(jumped, 300) - per_step[:1]).max()
    moved_fused = np.abs(fused - clean).max()
    assert moved_per_step > 0.01 and moved_fused < 0.3 * moved_per_step


# -----------------------------------------------------------------------------
# the command line

def label(tmp_path, *flags: str) -> int:
    return se.main(["--input", str(tmp_path / "seq.npy"), "--output", str(tmp_path / "soc.npy"), "--device", "cpu",
                    *flags])


def test_cli_default_labels_are_the_estimators(tmp_path, soc_model, random_est):
    x = real_windows(slice(0, 2030, 300), 30)   # [n, T, 4]: V, I, T, SOC
    np.save(tmp_path / "seq.npy", x)
    assert label(tmp_path, "--model", str(soc_model), "--window", "12") == 0
    default = np.load(tmp_path / "soc.npy")
    assert np.array_equal(default, random_est.label(x[..., :3], 12))   # bit for bit
    assert label(tmp_path, "--model", str(soc_model), "--window", "12", "--labels", "estimator") == 0
    assert np.array_equal(np.load(tmp_path / "soc.npy"), default)
    assert not (tmp_path / "soc.spread.npy").exists()


def test_cli_fused_writes_labels_and_spread(tmp_path, soc_model, random_est):
    x = real_windows(slice(0, 2030, 300), 30)
    np.save(tmp_path / "seq.npy", x)
    assert label(tmp_path, "--model", str(soc_model), "--window", "12", "--labels", "fused", "--data",
                 str(SIDECAR), "--readings", "4") == 0
    soc, spread = random_est.fused_labels(x[..., :3], SCALER, window=12, readings=4)
    assert np.array_equal(np.load(tmp_path / "soc.npy"), soc)
    assert np.array_equal(np.load(tmp_path / "soc.spread.npy"), spread)
    # the data's .npy names its sidecar too; a run's config.json holds the same scaler
    assert label(tmp_path, "--model", str(soc_model), "--window", "12", "--labels", "fused", "--data",
                 str(SIDECAR.with_suffix(".npy")), "--readings", "4") == 0
    assert np.array_equal(np.load(tmp_path / "soc.npy"), soc)


def test_cli_refuses_bad_input_with_one_line(tmp_path, soc_model, capsys):
    good = real_windows(slice(0, 40, 10), 30)
    (tmp_path / "no_scaler.json").write_text(json.dumps({"split": "train"}))
    (tmp_path / "no_capacity.json").write_text(json.dumps({"scaler": {k: v for k, v in SCALER.items()
                                                                       if k != "capacity_ah"}}))
    (tmp_path / "bad_capacity.json").write_text(json.dumps({"scaler": {**SCALER, "capacity_ah": {"25degC": -1}}}))
    (tmp_path / "junk.json").write_text("{not json")
    nan = good.copy()
    nan[2, 5, 1] = np.nan
    fused = ["--labels", "fused", "--data", str(SIDECAR)]
    cases = [(good, fused[:2], "--data"),
             (good, fused[:3] + [str(tmp_path / "no_scaler.json")], "no scaler"),
             (good, fused[:3] + [str(tmp_path / "no_capacity.json")], "capacity_ah"),
             (good, fused[:3] + [str(tmp_path / "bad_capacity.json")], "capacity_ah"),
             (good, fused[:3] + [str(tmp_path / "junk.json")], "JSON"),
             (good, fused[:3] + [str(tmp_path / "missing.json")], "not found"),
             (good[:, :10], fused, "shorter"),
             (good[..., :2], fused, "shape"),
             (good[0], fused, "shape"),
             (nan, fused, "NaN"),
             (nan, [], "NaN")]
    for seq, flags, words in cases:
        np.save(tmp_path / "seq.npy", seq)
        assert label(tmp_path, "--model", str(soc_model), "--window", "12", *flags) == 2, words
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
        assert not (tmp_path / "soc.npy").exists() and not (tmp_path / "soc.spread.npy").exists()
    r = subprocess.run([sys.executable, "soc_estimator.py", "--model", str(soc_model), "--input",
                        str(tmp_path / "seq.npy"), "--output", str(tmp_path / "soc.npy"), "--window", "12",
                        *fused], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "--labels fused" in subprocess.run([sys.executable, "soc_estimator.py", "-h"], cwd=ROOT,
                                              capture_output=True, text=True).stdout
