"""train_soc_estimator: schedules, metrics, exact resume, CLI on real mini fixtures, the shipped model's metrics,
training on generate.py's output (--train-data) alone and beside real cycles."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import train_soc_estimator as ts
from soc_estimator import SOCEstimator, SOCLSTM

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "tests" / "fixtures" / "mini"


def test_lr_schedules():
    assert ts.lr_at(0, 1e-3, "none", 10, 1e-5, 3, 0.5) == 1e-3
    assert ts.lr_at(0, 1e-3, "cosine", 10, 1e-5, 3, 0.5) == pytest.approx(1e-3)
    assert ts.lr_at(5, 1e-3, "cosine", 10, 1e-5, 3, 0.5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert ts.lr_at(10, 1e-3, "cosine", 10, 1e-5, 3, 0.5) == pytest.approx(1e-5)
    assert ts.lr_at(7, 1e-3, "step", 10, 1e-5, 3, 0.5) == pytest.approx(2.5e-4)
    assert ts.lr_at(99, 1e-3, "step", 10, 1e-5, 3, 0.5) == 1e-5


def test_metrics_pool_per_file_and_temperature():
    y = np.zeros(5, np.float32)
    pred = np.array([0.01, -0.01, 0.02, 0.0, 0.04], np.float32)
    index = [{"file": "0degC/a", "temp": "0degC", "start": 0, "stop": 2},
             {"file": "0degC/b", "temp": "0degC", "start": 2, "stop": 3},
             {"file": "25degC/c", "temp": "25degC", "start": 3, "stop": 5}]
    m = ts.metrics(pred, y, index)
    assert m["per_file"]["0degC/a"]["mae_pct"] == pytest.approx(1.0)
    assert m["per_temp"]["0degC"]["rmse_pct"] == pytest.approx(np.sqrt((1 + 1 + 4) / 3), rel=1e-6)
    assert m["per_temp"]["25degC"]["mae_pct"] == pytest.approx(2.0)
    assert m["overall"]["windows"] == 5 and m["overall"]["mae_pct"] == pytest.approx(1.6)


def tiny_run(tmp_path, epochs, resume, name="ck.pt", log=lambda s: None, average_from=0):
    rng = np.random.default_rng(0)
    X = rng.random((24, 12, 3), dtype=np.float32)
    y = X[:, -1, 0].copy()
    torch.manual_seed(0)
    m = SOCLSTM(3, 8)
    cfg = dict(lr=1e-2, lr_decay="cosine", min_lr=1e-4, step_every=2, gamma=0.5, epochs=epochs, patience=50,
               batch_size=8, seed=0, average_from=average_from)
    ck = ts.train(m, X[:18], y[:18], X[18:], y[18:], cfg, tmp_path / name, torch.device("cpu"), resume, log=log)
    return m, ck


def test_resume_continues_exactly(tmp_path):
    m_full, ck_full = tiny_run(tmp_path, 3, False, "full.pt")

    def kill_after_epoch_2(line):  # log runs after the checkpoint is written: like a kill between epochs
        if line.startswith("epoch 2:"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path, 3, False, "part.pt", log=kill_after_epoch_2)
    m_res, ck_res = tiny_run(tmp_path, 3, True, "part.pt")
    assert ck_res["epoch"] == 3 and len(ck_res["history"]) == 3
    assert [h["val_loss"] for h in ck_res["history"]] == [h["val_loss"] for h in ck_full["history"]]
    for a, b in zip(m_full.state_dict().values(), m_res.state_dict().values()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))


def test_weight_averaging_is_the_mean_of_end_of_epoch_weights_and_resumes(tmp_path):
    epoch_states = []

    def keep(line):  # log runs after each epoch's checkpoint is written
        epoch_states.append(torch.load(tmp_path / "avg.pt", weights_only=False)["model"])
    m, ck = tiny_run(tmp_path, 4, False, "avg.pt", log=keep, average_from=2)
    mean = {k: sum(s[k] for s in epoch_states[1:]) / 3 for k in epoch_states[0]}
    avg = {k[len("module."):]: v for k, v in ck["avg"].items() if k.startswith("module.")}
    assert ck["avg"]["n_averaged"].item() == 3 and avg.keys() == mean.keys()
    assert all(torch.allclose(avg[k], mean[k], atol=1e-6) for k in mean)
    assert [("val_rmse_avg_pct" in h) for h in ck["history"]] == [False, True, True, True]
    assert ck["best_val"] == min([h["val_loss"] for h in ck["history"]] +
                                 [h["val_loss_avg"] for h in ck["history"][1:]])
    assert ck["best_source"] == "epoch" or ck["best_source"].startswith("mean of epochs 2..")

    def kill_after_epoch_3(line):
        if line.startswith("epoch 3:"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path, 4, False, "avg_part.pt", log=kill_after_epoch_3, average_from=2)
    _, ck_res = tiny_run(tmp_path, 4, True, "avg_part.pt", average_from=2)
    assert all(torch.equal(ck_res["avg"][k], v) for k, v in ck["avg"].items())
    assert ck_res["best_source"] == ck["best_source"] and ck_res["best_epoch"] == ck["best_epoch"]


def test_early_stopping_restores_best(tmp_path):
    m, ck = tiny_run(tmp_path, 1, False)
    cfg = dict(lr=10.0, lr_decay="none", min_lr=0, step_every=1, gamma=1, epochs=50, patience=2, batch_size=8,
               seed=0)  # a huge learning rate: validation gets worse, training stops after `patience` epochs
    X = np.random.default_rng(1).random((16, 12, 3), dtype=np.float32)
    ck = ts.train(m, X[:12], X[:12, -1, 0].copy(), X[12:], X[12:, -1, 0].copy(), cfg, tmp_path / "es.pt",
                  torch.device("cpu"), log=lambda s: None)
    assert ck["epoch"] < 50 and ck["epoch"] - ck["best_epoch"] == 2
    best = ck["best_state"]
    assert all(torch.equal(best[k], v) for k, v in m.state_dict().items())


def test_cli_trains_evaluates_and_writes_everything(tmp_path, mini_lists, capsys):
    out = tmp_path / "m.h5"
    args = ["--raw-dir", str(MINI), "--out", str(out), "--window", "40", "--stride", "40", "--test-stride", "40",
            "--epochs", "2", "--lr", "1e-3", "--device", "cpu"]
    assert ts.main(args) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["epochs_run"] == 2 and side["window"] == 40 and len(side["history"]) == 2
    assert side["missing_test_files"] == ["10degC/582_LA92"]
    assert set(side["test_metrics"]["per_temp"]) == {"0degC", "10degC", "25degC"}
    assert side["scaler"]["min"][0] > 2.5 and side["command"].startswith("python train_soc_estimator.py")
    assert len(list((tmp_path / "test_cycles").glob("*.png"))) == 3
    assert SOCEstimator.load(out).model.hidden == 256
    assert (tmp_path / "m.ckpt.pt").exists()
    text = capsys.readouterr().out
    assert "582_LA92" in text and "overall" in text
    # the same model, evaluated alone, reproduces the recorded metrics
    m = ts.run(ts.parse_args(args + ["--evaluate", str(out), "--plots-dir", str(tmp_path / "p")]), [])
    assert m["overall"]["rmse_pct"] == pytest.approx(side["test_metrics"]["overall"]["rmse_pct"], rel=1e-4)


def test_init_starts_from_a_keras_file(tmp_path, mini_lists, soc_model):
    """--init fine-tunes a given model: with lr 0 (Adam's step is then exactly 0) the output equals the input."""
    out = tmp_path / "m.h5"
    args = ["--raw-dir", str(MINI), "--out", str(out), "--window", "40", "--stride", "40", "--test-stride", "40",
            "--epochs", "1", "--lr", "0", "--min-lr", "0", "--device", "cpu", "--init", str(soc_model)]
    assert ts.main(args) == 0
    a, b = SOCEstimator.load(soc_model).model.state_dict(), SOCEstimator.load(out).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(out.with_suffix(".json").read_text())["init"] == str(soc_model)


def test_cli_errors_exit_2(tmp_path, capsys):
    assert ts.main(["--raw-dir", str(tmp_path / "none"), "--out", str(tmp_path / "m.h5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert ts.main(["--evaluate", str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5" in capsys.readouterr().err
    assert ts.main(["--out", str(tmp_path / "m.h5")]) == 2  # training without data
    assert "--raw-dir" in capsys.readouterr().err


def test_shipped_model_reproduces_its_recorded_metrics():
    path = ROOT / "soc_models" / "lg_positive_temp_300_steps.h5"
    side = json.loads(path.with_suffix(".json").read_text())
    test = np.load(ROOT / "data" / "lg_test_300_data.npy", mmap_mode="r")
    index = json.loads((ROOT / "data" / "lg_test_300_data.json").read_text())["file_index"]
    it = min(index, key=lambda i: i["stop"] - i["start"])  # the smallest test cycle keeps this fast
    X = np.asarray(test[it["start"]:it["stop"], :, :3])
    pred = SOCEstimator.load(path).label(X, window=300)[:, 0]
    rmse = float(np.sqrt(np.mean((pred - test[it["start"]:it["stop"], -1, 3]) ** 2)) * 100)
    assert rmse == pytest.approx(side["test_metrics"]["per_file"][it["file"]]["rmse_pct"], abs=1e-3)
    assert side["missing_test_files"] == ["10degC/582_LA92"]


# ---- --train-data: generate.py's output as training windows -------------------------------------------------------

SCALER = json.loads((ROOT / "data" / "lg_600_data.json").read_text())["scaler"]
W = 30   # window of these tests: each 60-step sequence gives two


def write_generated(path: Path, x: np.ndarray, scaled: bool, **meta) -> Path:
    """x [n, L, 4] scaled V, I, T + SOC written as generate.py writes it (its own writer), in physical units
    unless scaled, with a sidecar like generate.py's."""
    import generate
    from lg_dataset import unscale
    columns = generate.SCALED_COLUMNS if scaled else generate.COLUMNS
    side = {"run": "1700000000_lstm_gan", "epoch": 150, "seed": 4, "n_sequences": len(x), "steps": x.shape[1],
            "columns": list(columns), "scaled": scaled, "scaler": SCALER, "soc": "SOC estimator soc.h5", **meta}
    generate.write_output(x if scaled else unscale(x, SCALER).astype(np.float32), path, columns, side)
    return path


@pytest.fixture(scope="module")
def sequences() -> np.ndarray:
    """8 real training sequences of 60 steps (scaled V, I, T, SOC) standing in for generated ones."""
    x = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")
    return np.ascontiguousarray(x[::250][:8, -60:])


@pytest.fixture(scope="module")
def test_windows_30(tmp_path_factory) -> Path:
    """The shipped test windows cut to their last 30 steps, 3 per test file, with the sidecar load_test_data reads."""
    test = np.load(ROOT / "data" / "lg_test_300_data.npy", mmap_mode="r")
    side = json.loads((ROOT / "data" / "lg_test_300_data.json").read_text())
    rows, index = [], []
    for it in side["file_index"]:
        index.append({**it, "start": len(rows), "stop": len(rows) + 3})
        rows += range(it["start"], it["start"] + 3)
    path = tmp_path_factory.mktemp("test30") / "test30.npy"
    np.save(path, np.ascontiguousarray(test[rows, -W:]))
    path.with_suffix(".json").write_text(json.dumps({"file_index": index, "scaler": side["scaler"]}))
    return path


@pytest.mark.parametrize("name, scaled", [("s.npy", True), ("s.parquet", False), ("s.csv", False),
                                          ("s_scaled.parquet", True), ("s_scaled.csv", True)])
def test_generated_windows_read_every_format_back(tmp_path, sequences, name, scaled):
    from metrics import soc_windows
    path = write_generated(tmp_path / name, sequences, scaled)
    X, y, info = ts.generated_windows(path, W, SCALER)
    expected = soc_windows(sequences, W)   # two windows per sequence, aligned to its end
    assert X.shape == (16, W, 3) and y.shape == (16,)
    assert np.allclose(X, expected[..., :3], atol=1e-5) and np.allclose(y, expected[:, -1, 3], atol=1e-6)
    assert info["sidecar"]["run"] == "1700000000_lstm_gan" and info["sidecar"]["epoch"] == 150
    assert info["sequences"] == 8 and info["windows"] == 16 and len(info["sha256"]) == 64
    # the estimator's own scaler: the values go through physical units into it
    other = {"min": [2.5, -20.0, -5.0], "max": [4.3, 8.0, 30.0], "units": SCALER["units"]}
    X_other, _, _ = ts.generated_windows(path, W, other)
    lo, hi, olo, ohi = (np.asarray(a[k][:3]) for a, k in ((SCALER, "min"), (SCALER, "max"), (other, "min"),
                                                          (other, "max")))
    assert np.allclose(X_other, ((expected[..., :3] * (hi - lo) + lo) - olo) / (ohi - olo), atol=1e-5)


def test_cli_trains_on_generated_data_alone_and_records_it(tmp_path, sequences, test_windows_30):
    data = write_generated(tmp_path / "syn.parquet", sequences, scaled=False)
    out = tmp_path / "m.h5"
    args = ["--train-data", str(data), "--test-data", str(test_windows_30), "--out", str(out), "--window", str(W),
            "--epochs", "2", "--lr", "1e-3", "--hidden", "8", "--val-split", "0.25", "--device", "cpu"]
    assert ts.main(args) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    on = side["trained_on"]
    assert on["file"] == str(data) and on["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert on["sidecar"]["seed"] == 4 and on["sidecar"]["soc"] == "SOC estimator soc.h5"
    assert on["synthetic_windows"] == 12 and on["real_windows"] == 0 and on["real_share"] == 0
    assert side["train_windows"] == 12 and side["val_windows"] == 4 and "synthetic" in on["validation"]
    assert side["test_metrics"]["overall"]["windows"] == 33 and SOCEstimator.load(out).model.hidden == 8
    assert side["architecture"].startswith("LSTM(8, selu, seq)")


def test_cli_mixes_generated_and_real_windows(tmp_path, sequences, mini_lists):
    data = write_generated(tmp_path / "syn.npy", sequences, scaled=True)
    common = ["--train-data", str(data), "--raw-dir", str(MINI), "--window", str(W), "--stride", str(W),
              "--test-stride", str(W), "--epochs", "1", "--lr", "1e-3", "--hidden", "8", "--device", "cpu"]
    assert ts.main(common + ["--out", str(tmp_path / "a.h5"), "--real-windows", "5"]) == 0
    side = json.loads((tmp_path / "a.json").read_text())
    on = side["trained_on"]
    assert on["real_windows"] == 5 and on["synthetic_windows"] == 16 and on["real_share"] == pytest.approx(5 / 21)
    assert side["train_windows"] == 21 and "real training windows" in on["validation"]
    assert on["real_files"] == side["train_files"] and len(side["train_files"]) == 3
    assert set(side["test_metrics"]["per_temp"]) == {"0degC", "10degC", "25degC"}
    real = ts.lg_dataset.soc_windows(MINI, "train", W, W)[0]
    assert side["val_windows"] == len(real) - int(len(real) * 0.8)   # validation as without --train-data
    assert ts.main(common + ["--out", str(tmp_path / "b.h5"), "--real-fraction", "1"]) == 0
    on = json.loads((tmp_path / "b.json").read_text())["trained_on"]
    assert on["real_windows"] == int(len(real) * 0.8) and on["real_fraction"] == 1.0


def test_cli_refuses_bad_generated_data(tmp_path, sequences, test_windows_30, capsys):
    good = write_generated(tmp_path / "good.npy", sequences, scaled=True)
    no_sidecar = tmp_path / "lone.npy"
    np.save(no_sidecar, sequences)
    wrong_columns = write_generated(tmp_path / "cols.csv", sequences, scaled=False)
    import pandas as pd
    pd.read_csv(wrong_columns).drop(columns="soc").to_csv(wrong_columns, index=False)
    nan = sequences.copy()
    nan[2, 5, 1] = np.nan
    with_nan = write_generated(tmp_path / "nan.npy", nan, scaled=True)
    short = write_generated(tmp_path / "short.parquet", sequences[:, -20:], scaled=False)
    out_dir = tmp_path / "out"
    base = ["--test-data", str(test_windows_30), "--out", str(out_dir / "m.h5"), "--window", str(W), "--epochs", "1",
            "--device", "cpu"]
    cases = {"sidecar": ["--train-data", str(no_sidecar)], "['soc'] missing": ["--train-data", str(wrong_columns)],
             "NaN": ["--train-data", str(with_nan)], "20 steps are shorter than the 30-step window":
             ["--train-data", str(short)],
             "need --raw-dir": ["--train-data", str(good), "--real-fraction", "0.5"],
             "not found": ["--train-data", str(tmp_path / "absent.parquet")]}
    for expected, extra in cases.items():
        assert ts.main(base + extra) == 2, expected
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, (expected, err)
    with pytest.raises(SystemExit) as stop:   # a flag's value: argparse's one line, exit 2
        ts.main(base + ["--train-data", str(good), "--real-fraction", "1.5"])
    assert stop.value.code == 2 and "must be in [0, 1]" in capsys.readouterr().err
    assert not out_dir.exists()   # nothing written


def test_cli_trains_on_what_generate_py_wrote(tiny_run, tmp_path, mini_lists):
    """End to end: the tiny GAN's generate.py output (its own sidecar) beside real windows of the mini folder."""
    import generate
    data = tmp_path / "syn.csv"
    assert generate.main(["-r", tiny_run.name, "--results-dir", str(tiny_run.parent), "-n", "6", "-o", str(data),
                          "--seed", "1", "--device", "cpu"]) == 0
    out = tmp_path / "m.h5"
    assert ts.main(["--train-data", str(data), "--raw-dir", str(MINI), "--out", str(out), "--window", "20",
                    "--stride", "20", "--test-stride", "20", "--real-windows", "2", "--epochs", "1", "--hidden", "8",
                    "--device", "cpu"]) == 0
    on = json.loads(out.with_suffix(".json").read_text())["trained_on"]
    assert on["sidecar"]["run"] == tiny_run.name and on["sidecar"]["seed"] == 1 and on["sidecar"]["epoch"] == 2
    assert on["synthetic_windows"] == 6 and on["real_windows"] == 2 and on["sequences"] == 6
