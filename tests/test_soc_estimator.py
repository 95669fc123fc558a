"""soc_estimator: selu cell numerics, Keras file I/O with h5py, streaming labels, errors, and Keras parity."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import soc_estimator as se
from soc_estimator import SOCEstimator, SOCLSTM, SOCModelError, load_keras_h5, save_keras_h5

ROOT = Path(__file__).resolve().parent.parent
HAVE_TF = importlib.util.find_spec("tensorflow") is not None


def keras_or_skip():
    """Keras tests skip without TensorFlow, except where CI demands them (REQUIRE_KERAS=1): then they fail."""
    if not HAVE_TF:
        if os.environ.get("REQUIRE_KERAS") == "1":
            pytest.fail("REQUIRE_KERAS=1 but TensorFlow is not installed (pip install -r requirements-keras.txt)")
        pytest.skip("TensorFlow/Keras not installed")


def small_model(seed=0, n_features=3, hidden=8) -> SOCLSTM:
    torch.manual_seed(seed)
    m = SOCLSTM(n_features, hidden)
    with torch.no_grad():  # non-trivial biases so every term of the cell is exercised
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def run(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x, np.float32))).numpy()


# -----------------------------------------------------------------------------
# numerics without TensorFlow

def test_selu_cell_single_step_by_hand():
    m = small_model(hidden=4)
    x = np.array([[[0.3, -0.7, 0.5]]], np.float32)
    w = {k: v.double().numpy() for k, v in m.state_dict().items()}
    sig = lambda z: 1 / (1 + np.exp(-z))
    a, s = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
    selu = lambda z: s * np.where(z > 0, z, a * (np.exp(z) - 1))

    def cell(z, u=4):  # Keras gate order i, f, c, o; zero initial state, so c = i * selu(z_c)
        i, f, g, o = sig(z[:u]), sig(z[u:2 * u]), selu(z[2 * u:3 * u]), sig(z[3 * u:])
        c = i * g
        return o * selu(c)
    h1 = cell(x[0, 0] @ w["lstm1.kernel"] + w["lstm1.bias"])
    h2 = cell(h1 @ w["lstm2.kernel"] + w["lstm2.bias"])
    d = selu(w["dense1.weight"] @ h2 + w["dense1.bias"])
    d = selu(w["dense2.weight"] @ d + w["dense2.bias"])
    want = w["dense3.weight"] @ d + w["dense3.bias"]
    assert np.allclose(run(m, x)[0], want, atol=1e-6)


def test_two_steps_use_recurrent_weights_and_cell_state():
    m = small_model(hidden=4)
    x = np.random.default_rng(1).random((2, 2, 3), dtype=np.float32)
    w = {k: v.double().numpy() for k, v in m.state_dict().items()}
    sig = lambda z: 1 / (1 + np.exp(-z))
    selu = lambda z: torch.nn.functional.selu(torch.from_numpy(z)).numpy()

    def layer(xs, k, r, b, u=4):
        h, c, out = np.zeros(u), np.zeros(u), []
        for xt in xs:
            z = xt @ k + h @ r + b
            c = sig(z[u:2 * u]) * c + sig(z[:u]) * selu(z[2 * u:3 * u])
            h = sig(z[3 * u:]) * selu(c)
            out.append(h)
        return np.array(out)
    for n in range(2):
        h1 = layer(x[n].astype(np.float64), w["lstm1.kernel"], w["lstm1.recurrent_kernel"], w["lstm1.bias"])
        h2 = layer(h1, w["lstm2.kernel"], w["lstm2.recurrent_kernel"], w["lstm2.bias"])[-1]
        d = selu(w["dense2.weight"] @ selu(w["dense1.weight"] @ h2 + w["dense1.bias"]) + w["dense2.bias"])
        assert np.allclose(run(m, x[n:n + 1])[0], w["dense3.weight"] @ d + w["dense3.bias"], atol=1e-6)


def test_h5_roundtrip_is_exact(tmp_path):
    m = small_model()
    save_keras_h5(m, tmp_path / "m.h5")
    m2 = load_keras_h5(tmp_path / "m.h5")
    x = np.random.default_rng(0).random((5, 30, 3), dtype=np.float32)
    assert np.array_equal(run(m, x), run(m2, x))
    with h5py.File(tmp_path / "m.h5") as f:  # the legacy Keras 2 layout, without the key Keras 3 rejects
        assert "model_weights" in f and "keras_version" in f.attrs
        assert "time_major" not in se._text(f.attrs["model_config"])
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file behind


def test_label_equals_explicit_windows_and_streams(tmp_path, device):
    m = small_model()
    save_keras_h5(m, tmp_path / "m.h5")
    est = SOCEstimator.load(tmp_path / "m.h5", device)   # on CUDA: against the CPU model
    seq = np.random.default_rng(2).random((3, 25, 3)).astype(np.float64)  # float64 in: converted
    seen = []
    forward = est.model.forward
    est.model.forward = lambda x: (seen.append(len(x)), forward(x))[1]
    est.cuda_graphs = False
    out = est.label(seq, window=10, batch_size=7)
    assert out.dtype == np.float32 and out.shape == (3, 16)
    assert max(seen) <= 7 and sum(seen) == 3 * 16  # streamed in batches, every window once
    want = np.array([[run(m, seq[i:i + 1, k:k + 10])[0, 0] for k in range(16)] for i in range(3)])
    assert np.allclose(out, want, atol=1e-6)
    assert np.allclose(est.label(seq, window=25), run(m, seq), atol=1e-6)  # window == T: one column
    # on CUDA, a CUDA graph of the network replayed for every batch (the last, shorter one too): same labels
    est.cuda_graphs = True
    np.testing.assert_allclose(est.label(seq, window=10, batch_size=7), out, rtol=0, atol=1e-6)
    assert len(est._graphs) == (device == "cuda")


def test_import_does_not_pull_in_tensorflow_or_keras():
    code = ("import sys; import soc_estimator; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -----------------------------------------------------------------------------
# errors: one line, SOCModelError, CLI exit 2

def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(SOCModelError) as e:
        load_keras_h5(tmp_path / "nope.h5")
    assert "not found" in one_line(e)
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(SOCModelError) as e:
        SOCEstimator.load(tmp_path / "junk.h5")
    assert "junk.h5" in one_line(e)
    save_keras_h5(small_model(), tmp_path / "m.h5")
    data = (tmp_path / "m.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[:len(data) // 2])
    with pytest.raises(SOCModelError) as e:
        load_keras_h5(tmp_path / "cut.h5")
    one_line(e)


def test_wrong_architecture(tmp_path):
    save_keras_h5(small_model(), tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "a") as f:  # a Dense of the wrong width
        g = f["model_weights/dense_1"]
        del g["dense_1/kernel:0"]
        g.create_dataset("dense_1/kernel:0", data=np.zeros((8, 5), np.float32))
    with pytest.raises(SOCModelError) as e:
        load_keras_h5(tmp_path / "m.h5")
    assert "shape" in one_line(e)
    save_keras_h5(small_model(), tmp_path / "tanh.h5")
    with h5py.File(tmp_path / "tanh.h5", "a") as f:  # right shapes, but tanh instead of selu
        f.attrs["model_config"] = se._text(f.attrs["model_config"]).replace('"selu"', '"tanh"')
    with pytest.raises(SOCModelError) as e:
        load_keras_h5(tmp_path / "tanh.h5")
    assert "activation" in one_line(e)
    with h5py.File(tmp_path / "tanh.h5", "a") as f:  # one layer fewer
        del f.attrs["model_config"]
        f["model_weights"].attrs["layer_names"] = np.array([b"lstm", b"lstm_1", b"dense", b"dense_1"])
    with pytest.raises(SOCModelError) as e:
        load_keras_h5(tmp_path / "tanh.h5")
    one_line(e)


def test_bad_sequences(tmp_path):
    save_keras_h5(small_model(), tmp_path / "m.h5")
    est = SOCEstimator.load(tmp_path / "m.h5")
    seq = np.zeros((2, 20, 3), np.float32)
    for bad, kw in [(seq, {"window": 21}), (seq, {"window": 0}), (seq[..., :2], {"window": 5}),
                    (seq[0], {"window": 5})]:
        with pytest.raises(SOCModelError) as e:
            est.label(bad, **kw)
        one_line(e)
    nan = seq.copy()
    nan[1, 3, 2] = np.nan
    with pytest.raises(SOCModelError) as e:
        est.label(nan, window=5)
    assert "NaN" in one_line(e)


def test_cli_labels_and_fails_cleanly(tmp_path, capsys):
    save_keras_h5(small_model(), tmp_path / "m.h5")
    np.save(tmp_path / "seq.npy", np.random.default_rng(0).random((2, 12, 4), dtype=np.float32))
    assert se.main(["--model", str(tmp_path / "m.h5"), "--input", str(tmp_path / "seq.npy"),
                    "--output", str(tmp_path / "soc.npy"), "--window", "10", "--device", "cpu"]) == 0
    assert np.load(tmp_path / "soc.npy").shape == (2, 3)
    capsys.readouterr()
    assert se.main(["--model", str(tmp_path / "missing.h5"), "--bench", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    r = subprocess.run([sys.executable, "soc_estimator.py", "--model", str(tmp_path / "m.h5"), "--input",
                        str(tmp_path / "seq.npy"), "--output", str(tmp_path / "o.npy"), "--window", "13",
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_shipped_model_loads_and_is_sane():
    path = ROOT / "soc_models" / "lg_positive_temp_300_steps.h5"
    est = SOCEstimator.load(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["window"] == 300 and est.model.hidden == 256
    test = np.load(ROOT / "data" / "lg_test_300_data.npy", mmap_mode="r")
    idx = np.arange(0, len(test), 97)[:24]  # a spread of real test windows
    pred = est.label(np.asarray(test[idx, :, :3]), window=300)[:, 0]
    assert np.sqrt(np.mean((pred - test[idx, -1, 3]) ** 2)) < 0.05


# -----------------------------------------------------------------------------
# Keras parity (needs TensorFlow; CI sets REQUIRE_KERAS=1). Each Keras flavour runs in its own subprocess
# (tf-keras and Keras 3 in one process, or a second Keras backend, would interfere).

def keras_sized_model(seed: int) -> SOCLSTM:
    """Full-size network, Keras' initialisation plus random biases (random weights everywhere would make the
    selu recurrence explode, and then no two implementations agree)."""
    torch.manual_seed(seed)
    m = SOCLSTM()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


# a 2021-style file: tf.keras 2.x, layer names numbered after other models were built, TF 2.4's attrs
TFKERAS_SCRIPT = r"""
import sys, json, numpy as np, h5py, tf_keras as keras
L = keras.layers
keras.utils.set_random_seed(2)
def build():
    return keras.Sequential([L.InputLayer(input_shape=(None, 3)),
                             L.LSTM(256, activation="selu", return_sequences=True),
                             L.LSTM(256, activation="selu"), L.Dense(256, activation="selu"),
                             L.Dense(128, activation="selu"), L.Dense(1, activation="linear")])
build(); build()  # the authors' notebook built models before the saved one: names lstm_4, dense_6, ...
m = build()
for layer in m.layers:  # random biases (Keras initialises them to zero)
    w = layer.get_weights(); w[-1] = w[-1] + np.random.default_rng(4).normal(0, 0.1, w[-1].shape); layer.set_weights(w)
m.compile(optimizer=keras.optimizers.Adam(1e-5), loss=keras.losses.Huber())
out = sys.argv[1]
x = np.load(out + "/x.npy")
np.save(out + "/legacy_pred.npy", m.predict(x, verbose=0))
m.save(out + "/legacy.h5")
ours = keras.models.load_model(out + "/ours.h5", compile=False)  # the project's writer, read by tf-keras
np.save(out + "/ours_pred_tfk.npy", ours.predict(x, verbose=0))
# edit to what TF 2.4 wrote: keras_version 2.4.0, fixed-length byte attrs, cells numbered like their layer
with h5py.File(out + "/legacy.h5", "a") as f:
    f.attrs["keras_version"] = np.bytes_("2.4.0")
    f["model_weights"].attrs["keras_version"] = np.bytes_("2.4.0")
    g = f["model_weights"]
    names = [n.decode() if isinstance(n, bytes) else n for n in g.attrs["layer_names"]]
    g.attrs["layer_names"] = np.array([n.encode() for n in names])
    for n in names:
        lg = g[n]
        new = []
        for w in [w.decode() if isinstance(w, bytes) else w for w in lg.attrs["weight_names"]]:
            v = w.replace("/lstm_cell/", "/lstm_cell_" + n.split("_")[-1] + "/")
            if v != w:
                lg.move(w, v)
            new.append(v)
        lg.attrs["weight_names"] = np.array([w.encode() for w in new])
    assert json.loads(f.attrs["model_config"])["config"]["layers"][1]["config"]["time_major"] is False
print(names)
"""

# Keras 3 (KERAS_BACKEND from the environment): its own .h5 and .keras, our file without custom objects, and
# SOCEstimator's keras backend on the legacy file (time_major) and ours
KERAS3_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
import keras
from soc_estimator import SOCEstimator
out, L = sys.argv[1], keras.layers
x = np.load(out + "/x.npy")
if keras.backend.backend() == "tensorflow":
    keras.utils.set_random_seed(1)
    m = keras.Sequential([keras.Input((None, 3)), L.LSTM(256, activation="selu", return_sequences=True),
                          L.LSTM(256, activation="selu"), L.Dense(256, activation="selu"),
                          L.Dense(128, activation="selu"), L.Dense(1)])
    for layer in m.layers:
        w = layer.get_weights(); w[-1] = w[-1] + np.random.default_rng(3).normal(0, 0.1, w[-1].shape)
        layer.set_weights(w)
    m.compile(optimizer=keras.optimizers.Adam(1e-5), loss=keras.losses.Huber())
    m.save(out + "/k3.h5"); m.save(out + "/k3.keras")
    np.save(out + "/k3_pred.npy", m.predict(x, verbose=0))
    np.save(out + "/ours_pred_k3.npy", keras.models.load_model(out + "/ours.h5").predict(x, verbose=0))
for name in ("legacy.h5", "ours.h5"):
    est = SOCEstimator.load(out + "/" + name, backend="keras")
    np.save(out + "/" + name + "." + keras.backend.backend() + ".npy", est.label(x, window=300, batch_size=2))
"""


def run_keras(script: str, tmp_path: Path, backend: str = "tensorflow") -> str:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": backend,
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(ROOT)], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory) -> Path:
    """legacy.h5 (tf-keras, 2021 layout), k3.h5 / k3.keras (Keras 3), ours.h5, with Keras' predictions."""
    keras_or_skip()
    d = tmp_path_factory.mktemp("keras")
    np.save(d / "x.npy", np.random.default_rng(5).random((3, 300, 3), dtype=np.float32))
    save_keras_h5(keras_sized_model(seed=1), d / "ours.h5")
    assert "lstm_4" in run_keras(TFKERAS_SCRIPT, d)  # the legacy file really has the shifted names
    run_keras(KERAS3_SCRIPT, d)
    return d


@pytest.mark.keras
def test_torch_port_equals_keras(keras_files):
    d = keras_files
    x = np.load(d / "x.npy")
    for name, pred in [("k3.h5", "k3_pred"), ("k3.keras", "k3_pred"), ("legacy.h5", "legacy_pred")]:
        ours = run(load_keras_h5(d / name), x)
        assert np.abs(ours - np.load(d / f"{pred}.npy")).max() <= 1e-5, name
    ref = run(load_keras_h5(d / "ours.h5"), x)  # our writer's file, as Keras 3 and tf-keras read it
    for pred in ("ours_pred_k3", "ours_pred_tfk"):
        assert np.abs(ref - np.load(d / f"{pred}.npy")).max() <= 1e-5, pred


@pytest.mark.keras
def test_keras_backend_labels_like_torch_tf(keras_files):
    d = keras_files
    x = np.load(d / "x.npy")
    for name in ("legacy.h5", "ours.h5"):
        got = np.load(d / f"{name}.tensorflow.npy")
        assert got.shape == (3, 1)
        assert np.abs(got - SOCEstimator.load(d / name).label(x, window=300)).max() <= 1e-5, name


@pytest.mark.keras
@pytest.mark.slow
def test_keras_backend_on_torch_backend(keras_files):
    d = keras_files
    run_keras(KERAS3_SCRIPT, d, backend="torch")
    x = np.load(d / "x.npy")
    for name in ("legacy.h5", "ours.h5"):
        got = np.load(d / f"{name}.torch.npy")
        assert np.abs(got - SOCEstimator.load(d / name).label(x, window=300)).max() <= 1e-5, name
