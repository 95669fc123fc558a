"""downstream.py: the training cycles split by file, the configurations' training sets, the whole protocol at toy
size (its record, its pairing across configurations, its plot), bad settings refused."""
import json
from pathlib import Path

import numpy as np
import pytest

import downstream as ds
from common import UserError
from soc_estimator import SOCEstimator

ROOT = Path(__file__).resolve().parent.parent
SCALER = json.loads((ROOT / "data" / "lg_600_data.json").read_text())["scaler"]
W = 30
TOY = {"hidden": 8, "lr": 1e-2, "batch_size": 16, "epochs": 2, "patience": 2, "name": "toy"}


@pytest.fixture(scope="module")
def real():
    x = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")
    return x, json.loads((ROOT / "data" / "lg_600_data.json").read_text())["file_index"]


@pytest.fixture(scope="module")
def test_set():
    """The real test windows cut to their last 30 steps, 4 per test file, with a file_index for them."""
    x = np.load(ROOT / "data" / "lg_test_300_data.npy", mmap_mode="r")
    rows, index = [], []
    for it in json.loads((ROOT / "data" / "lg_test_300_data.json").read_text())["file_index"]:
        index.append({**it, "start": len(rows), "stop": len(rows) + 4})
        rows += range(it["start"], it["stop"], (it["stop"] - it["start"]) // 4)[:4]
    return ds.windows(np.asarray(x[rows, -W:]), W), index


def test_training_cycles_hold_out_whole_files(real):
    x, index = real
    pool, val, files = ds.training_cycles(x, index)
    assert files == ["0degC/590_Mixed8", "10degC/571_Mixed8", "25degC/552_Mixed8"]
    n_val = sum(it["stop"] - it["start"] for it in index if it["file"] in files)
    assert len(val[0]) == 2 * n_val and len(pool.x) + len(val[0]) == 2 * len(x)   # two 300-step windows each
    assert len(pool.sequences) == len(x) - n_val and np.array_equal(ds.windows(pool.sequences)[0], pool.x)
    first = next(it for it in index if it["file"] == files[0])
    assert np.array_equal(val[0][0], x[first["start"], :300, :3]) and val[1][1] == x[first["start"], -1, 3]
    assert ds.training_cycles(x, index, val_files=["0degC/589_Mixed1"])[2] == ["0degC/589_Mixed1"]
    with pytest.raises(UserError, match="not in the real data"):
        ds.training_cycles(x, index, val_files=["0degC/589_UDDS"])


def test_estimator_labeller_reads_the_last_step_of_each_window(soc_model, test_set, real):
    (X, _), _ = test_set
    est = SOCEstimator.load(soc_model)
    label = ds.estimator_labeller(est, W)
    assert np.allclose(label(X[:5]), est.label(X[:5], window=W)[:, 0], atol=1e-6) and soc_model.name in label.name
    seqs = np.asarray(real[0][:3, -3 * W:])   # three windows from each sequence, in windows()' order
    cut = ds.windows(seqs, W)[0]
    assert np.allclose(label(seqs), est.label(cut, window=W)[:, 0], atol=1e-6)


def test_fused_labeller_labels_whole_sequences_then_cuts_them(soc_model, real):
    """Fused labels of a 2W-step sequence: the fused labels of the whole sequence at each window's end, not of
    each window alone; they follow the charge counted from the current (what makes them fused)."""
    est = SOCEstimator.load(soc_model)
    seqs = np.asarray(real[0][:4, -2 * W:])
    label = ds.fused_labeller(est, SCALER, W)
    soc, _ = est.fused_labels(seqs[..., :3], SCALER, W)
    assert np.allclose(label(seqs), soc[:, [W - 1, 2 * W - 1]].reshape(-1), atol=1e-6)
    alone = label(np.concatenate([seqs[:, :W], seqs[:, W:]]))   # each window labelled on its own: other levels
    assert not np.allclose(np.sort(alone), np.sort(label(seqs)), atol=1e-4)
    assert "fused" in label.name and ds.labeller_for("fused", est, SCALER, W).name == label.name
    assert ds.labeller_for("estimator", est, SCALER, W).name == ds.estimator_labeller(est, W).name


def test_training_sets_nest_and_repeat(real):
    x, index = real
    pool = ds.pool_of(np.asarray(x[:60, -60:]), W)
    syn = ds.windows(np.asarray(x[100:150, -60:]), W)
    sets = ds.training_sets(pool, np.full(len(pool.x), 0.5, np.float32), syn, 40, (0.05, 0.1),
                            np.random.default_rng(0), "half")
    assert list(sets) == ["trtr", "label_source", "tstr", "real_5pct", "real_5pct+synthetic", "real_10pct",
                          "real_10pct+synthetic"]
    (trx, try_), _ = sets["trtr"]
    assert np.array_equal(sets["label_source"][0][0], trx) and (sets["label_source"][0][1] == 0.5).all()
    assert sets["label_source"][1]["labels"] == "half"
    (small, small_y), info = sets["real_10pct"]
    assert info == {"n_real": 4, "n_synthetic": 0, "labels": "true"} and len(sets["real_5pct"][0][0]) == 2
    assert all(any(np.array_equal(s, t) for t in trx) for s in small)   # a subset of the TRTR windows
    assert len(sets["real_10pct+synthetic"][0][0]) == 44 and sets["tstr"][1]["n_synthetic"] == 40
    rep = ds.repeated((small, small_y), 40)
    assert len(rep[0]) == 40 and np.array_equal(rep[0][4:8], small)
    with pytest.raises(UserError, match="lower N"):
        ds.training_sets(pool, pool.y, syn, 500, (0.1,), np.random.default_rng(0))


def test_protocol_records_every_configuration_and_seed(real, test_set, tmp_path):
    x, index = real
    pool = ds.pool_of(np.asarray(x[:80, -60:]), W)
    val = ds.windows(np.asarray(x[1900:1920, -60:]), W)
    syn = ds.windows(np.asarray(x[600:650, -60:]), W)
    oracle = lambda seqs: ds.windows(seqs, W)[1]   # the true SOC as a labeller
    oracle.name = "oracle"
    (X_test, y_test), test_index = test_set
    result = ds.run_protocol(pool, val, (X_test, y_test), test_index, syn, oracle, n=40, shares=(0.05, 0.1),
                             seeds=(0, 1), budget=TOY, settings={"run": "toy"}, log=lambda line: None)
    configs = result["configurations"]
    assert len(configs) == 7 and all(len(c["runs"]) == 2 for c in configs.values())
    assert result["settings"]["run"] == "toy" and result["settings"]["labeller"] == "oracle"
    assert result["settings"]["label_source_error_pct"] == {"rmse_pct": 0.0, "mae_pct": 0.0}
    assert result["settings"]["test_windows"] == 44 and result["budget"]["hidden"] == 8 and result["seeds"] == [0, 1]
    # the labeller reads the true SOC: the label-source set is the TRTR set, the same seed gives the same model
    for a, b in zip(configs["trtr"]["runs"], configs["label_source"]["runs"]):
        assert a["overall"] == b["overall"]
    runs = [r["overall"]["rmse_pct"] for r in configs["tstr"]["runs"]]
    assert configs["tstr"]["mean"]["rmse_pct"] == pytest.approx(np.mean(runs))
    assert configs["tstr"]["sd"]["rmse_pct"] == pytest.approx(np.std(runs, ddof=1))
    assert set(configs["trtr"]["runs"][0]["per_temp"]) == {"0degC", "10degC", "25degC"}
    assert "25degC/mae_pct" in configs["trtr"]["mean"]
    assert all(r["train_windows"] >= 40 for c in configs.values() for r in c["runs"])   # small sets repeated
    ratios = result["ratios"]
    assert ratios["tstr_over_trtr"] == pytest.approx(configs["tstr"]["mean"]["rmse_pct"] /
                                                     configs["trtr"]["mean"]["rmse_pct"])
    assert ratios["label_source_over_trtr"] == pytest.approx(1.0) and "real_10pct+synthetic_over_real_10pct" in ratios
    json.dumps(result)   # ready for downstream.json
    ds.plot(result, tmp_path / "downstream.png")
    assert (tmp_path / "downstream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="shares"):
        ds.run_protocol(pool, val, (X_test, y_test), test_index, syn, oracle, n=40, shares=(1.5,), budget=TOY)
