"""
The paper's LSTM SOC estimator (Wong et al. 2021/2023) in torch, with Keras-compatible weight files.

Network (Keras Sequential in the original): LSTM(256, selu, return_sequences) -> LSTM(256, selu) -> Dense(256, selu)
-> Dense(128, selu) -> Dense(1). Input: windows [B, window, 3] of min-max scaled V, I, T; output: SOC in [0, 1] at
the window's last step.

Keras' selu LSTM is not torch's nn.LSTM (tanh only), so the cell is written out here: gates i, f, c, o in Keras'
order, sigmoid gates, selu candidate and selu output. Weights are kept in Keras' layout (kernel [in, 4u],
recurrent_kernel [u, 4u], bias [4u]) so that loading and saving Keras files is a plain copy.

Keras files are read and written with h5py alone: importing this module never imports TensorFlow or Keras. The
optional Keras backend (SOCEstimator.load(..., backend="keras")) imports Keras only when asked for.

Two labellings of a sequence [n, T, 3]:
- label() (the paper's, the default): the estimator's reading at every step from window-1 on, [n, T - window + 1].
- fused_labels(): every step, [n, T], SOC_t = s0 + the charge counted from the current up to step t (counted_soc:
  physical units from the data's scaler, dt 0.1 s, Q of the nearest temperature class's capacity_ah); s0 the
  median of 4 readings' (reading - counted charge), the readings evenly spaced from step window-1 to T-1; plus the
  readings' root-mean-square spread about s0 per sequence. From the true SOC, 0.81x the per-step labels' RMSE on the
  training windows and 0.85x on the test cycles, from 4 windows through the network instead of T - window + 1
  (docs/experiments/2026-12-08-fused-labels.md).

Command line: `python soc_estimator.py --input windows.npy --output soc.npy` writes label()'s [n, T - window + 1];
with `--labels fused --data data/lg_600_data.json` (the data's sidecar, or a run's config.json: the scaler with
capacity_ah) it writes fused_labels()'s [n, T] to soc.npy and the spread, float32 [n] in SOC units, to
soc.spread.npy.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import OneLineParser, UserError, atomic_npy, atomic_write, cli, int_at_least


class SOCModelError(UserError):
    """One-line, user-facing: names the file, the problem and the fix."""


# -----------------------------------------------------------------------------
# the network

class SeluLSTMLayer(nn.Module):
    """One Keras LSTM layer with activation='selu', recurrent_activation='sigmoid', weights in Keras layout."""

    def __init__(self, n_in: int, units: int):
        super().__init__()
        self.units = units
        self.kernel = nn.Parameter(torch.empty(n_in, 4 * units))
        self.recurrent_kernel = nn.Parameter(torch.empty(units, 4 * units))
        self.bias = nn.Parameter(torch.zeros(4 * units))
        # Keras' defaults: glorot-uniform kernel, orthogonal recurrent kernel, forget-gate bias 1
        nn.init.xavier_uniform_(self.kernel)
        nn.init.orthogonal_(self.recurrent_kernel)
        with torch.no_grad():
            self.bias[units:2 * units] = 1.0


def selu_lstm_step(z: torch.Tensor, c: torch.Tensor, u: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One cell update from the pre-activations z [B, 4u] (gate order i, f, c, o) and the cell state c."""
    zi, zf, zg, zo = z.chunk(4, 1)  # one split (and one backward node) instead of four slices
    i, f, o = torch.sigmoid(zi), torch.sigmoid(zf), torch.sigmoid(zo)
    g = F.selu(zg)
    c = f * c + i * g
    h = o * F.selu(c)
    return h, c


class SOCLSTM(nn.Module):
    """The paper's network; input [B, window, 3] scaled V, I, T -> [B, 1] SOC at the last step."""

    def __init__(self, n_features: int = 3, hidden: int = 256):
        super().__init__()
        self.n_features, self.hidden = n_features, hidden
        self.lstm1 = SeluLSTMLayer(n_features, hidden)
        self.lstm2 = SeluLSTMLayer(hidden, hidden)
        self.dense1 = nn.Linear(hidden, hidden)
        self.dense2 = nn.Linear(hidden, hidden // 2)
        self.dense3 = nn.Linear(hidden // 2, 1)
        for d in (self.dense1, self.dense2, self.dense3):  # Keras' Dense defaults
            nn.init.xavier_uniform_(d.weight)
            nn.init.zeros_(d.bias)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.dense3(F.selu(self.dense2(F.selu(self.dense1(h)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, n_features] -> [B, 1]: the head on the second LSTM's last hidden state."""
        B, T, _ = x.shape
        u = self.hidden
        l1, l2 = self.lstm1, self.lstm2
        # layer 2 takes [h1, h2] through one stacked matrix: one matmul per step instead of two
        w2 = torch.cat([l2.kernel, l2.recurrent_kernel], 0)
        h1 = x.new_zeros(B, u); c1 = x.new_zeros(B, u)
        h2 = x.new_zeros(B, u); c2 = x.new_zeros(B, u)
        # the input projection of layer 1 for many steps in one matmul; chunked in time so that labelling large
        # batches stays within ~128 MB for this buffer
        chunk = max(1, min(T, (32 << 20) // max(1, B * 4 * u)))
        for t0 in range(0, T, chunk):
            xp = torch.addmm(l1.bias, x[:, t0:t0 + chunk].reshape(-1, x.shape[2]), l1.kernel)
            # unbind, not xp[:, t]: indexing would make every step's backward fill a full-size zero gradient
            for xpt in xp.view(B, -1, 4 * u).unbind(1):
                h1, c1 = selu_lstm_step(torch.addmm(xpt, h1, l1.recurrent_kernel), c1, u)
                h2, c2 = selu_lstm_step(torch.addmm(l2.bias, torch.cat([h1, h2], 1), w2), c2, u)
        return self.head(h2)


# -----------------------------------------------------------------------------
# Keras files, read and written with h5py alone

KERAS_WEIGHTS = ("lstm1", "lstm2", "dense1", "dense2", "dense3")  # the weighted layers, in Keras' order


def _text(v) -> str:
    """HDF5 attrs come back as str, bytes, numpy bytes or 0-d arrays depending on who wrote them."""
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


def _names(attr) -> list[str]:
    return [_text(a) for a in np.atleast_1d(attr)]


def _bad(path, problem: str) -> SOCModelError:
    return SOCModelError(f"{path}: {problem}; expected the paper's SOC estimator (LSTM-LSTM-Dense-Dense-Dense) saved "
                         f"by Keras as .h5 or .keras, or by soc_estimator.save_keras_h5")


def _check_config(path, layers: list[dict]) -> None:
    """Architecture from a Keras model config: weighted layers LSTM(selu, sigmoid), LSTM, Dense x 3."""
    kinds = [(l.get("class_name"), l.get("config", {})) for l in layers if l.get("class_name") != "InputLayer"]
    classes = [k for k, _ in kinds]
    if classes != ["LSTM", "LSTM", "Dense", "Dense", "Dense"]:
        raise _bad(path, f"layers {classes}")
    want = [("selu", True), ("selu", False), ("selu",), ("selu",), ("linear",)]
    for (cls, cfg), w in zip(kinds, want):
        act = cfg.get("activation")
        if act != w[0]:
            raise _bad(path, f"{cls} {cfg.get('name')} has activation {act!r}, not {w[0]!r}")
        if cls == "LSTM":
            if cfg.get("recurrent_activation", "sigmoid") != "sigmoid" or not cfg.get("use_bias", True):
                raise _bad(path, f"LSTM {cfg.get('name')} is not a sigmoid-gated LSTM with bias")
            if bool(cfg.get("return_sequences")) != w[1] or cfg.get("go_backwards") or cfg.get("stateful"):
                raise _bad(path, f"LSTM {cfg.get('name')} has other sequence settings")


def _model_from_arrays(path, arrays: list[list[np.ndarray]]) -> SOCLSTM:
    """arrays: per weighted layer, Keras' weight order (LSTM: kernel, recurrent_kernel, bias; Dense: kernel, bias)."""
    if [len(a) for a in arrays] != [3, 3, 2, 2, 2]:
        raise _bad(path, f"weight counts per layer {[len(a) for a in arrays]}")
    n_features, h4 = arrays[0][0].shape if arrays[0][0].ndim == 2 else (0, 0)
    hidden = h4 // 4
    model = SOCLSTM(n_features, hidden)
    want = {"lstm1": [(n_features, 4 * hidden), (hidden, 4 * hidden), (4 * hidden,)],
            "lstm2": [(hidden, 4 * hidden), (hidden, 4 * hidden), (4 * hidden,)],
            "dense1": [(hidden, hidden), (hidden,)], "dense2": [(hidden, hidden // 2), (hidden // 2,)],
            "dense3": [(hidden // 2, 1), (1,)]}
    if hidden < 2 or n_features < 1:
        raise _bad(path, f"first LSTM kernel shape {arrays[0][0].shape}")
    for name, arrs in zip(KERAS_WEIGHTS, arrays):
        shapes = [tuple(a.shape) for a in arrs]
        if shapes != want[name]:
            raise _bad(path, f"layer {KERAS_WEIGHTS.index(name) + 1} has weight shapes {shapes}, expected "
                             f"{want[name]}")
        if not all(np.isfinite(a).all() for a in arrs):
            raise _bad(path, f"layer {KERAS_WEIGHTS.index(name) + 1} holds NaN/inf weights")
    with torch.no_grad():
        for name, arrs in zip(KERAS_WEIGHTS, arrays):
            mod = getattr(model, name)
            if name.startswith("lstm"):
                for p, a in zip((mod.kernel, mod.recurrent_kernel, mod.bias), arrs):
                    p.copy_(torch.from_numpy(np.asarray(a, np.float32)))
            else:  # Keras Dense kernel is [in, out], torch Linear weight is [out, in]
                mod.weight.copy_(torch.from_numpy(np.asarray(arrs[0], np.float32).T))
                mod.bias.copy_(torch.from_numpy(np.asarray(arrs[1], np.float32)))
    return model


def _read_legacy_h5(path, f: h5py.File) -> SOCLSTM:
    """Keras 2 (tf.keras, 2021) and Keras 3 `.h5`: order from layer_names / weight_names attrs."""
    cfg = f.attrs.get("model_config")
    if cfg is not None:
        cfg = json.loads(_text(cfg))
        layers = cfg.get("config", {}).get("layers") if isinstance(cfg.get("config"), dict) else cfg.get("config")
        if cfg.get("class_name") != "Sequential" or not isinstance(layers, list):
            raise _bad(path, f"model is a {cfg.get('class_name')}, not a Sequential")
        _check_config(path, layers)
    g = f["model_weights"] if "model_weights" in f else f  # model.save vs model.save_weights
    if "layer_names" not in g.attrs:
        raise _bad(path, "no layer_names attribute (not a Keras HDF5 model file)")
    arrays = []
    for layer in _names(g.attrs["layer_names"]):
        names = _names(g[layer].attrs.get("weight_names", []))
        if names:  # input layers and top_level_model_weights carry none
            arrays.append([np.asarray(g[layer][n]) for n in names])
    return _model_from_arrays(path, arrays)


def _read_keras_zip(path) -> SOCLSTM:
    """Keras 3 `.keras`: config.json gives the layer order, model.weights.h5 holds layers/<name>/[cell/]vars/<i>."""
    with zipfile.ZipFile(path) as z:
        cfg = json.loads(z.read("config.json"))
        weights = io.BytesIO(z.read("model.weights.h5"))
    layers = cfg.get("config", {}).get("layers")
    if cfg.get("class_name") != "Sequential" or not isinstance(layers, list):
        raise _bad(path, f"model is a {cfg.get('class_name')}, not a Sequential")
    _check_config(path, layers)
    arrays = []
    with h5py.File(weights, "r") as f:
        for layer in layers:
            if layer["class_name"] == "InputLayer":
                continue
            g = f["layers"][layer["config"]["name"]]
            v = g["cell"]["vars"] if "cell" in g else g["vars"]
            arrays.append([np.asarray(v[str(i)]) for i in range(len(v))])
    return _model_from_arrays(path, arrays)


def load_keras_h5(path: str | Path) -> SOCLSTM:
    """Load the paper's network from a Keras file (.h5 by Keras 2 or 3, .keras zip) with h5py only."""
    path = Path(path)
    if not path.is_file():
        raise SOCModelError(f"{path}: model file not found; pass the path of a Keras .h5/.keras SOC model, e.g. "
                            f"soc_models/lg_positive_temp_300_steps.h5")
    try:
        if zipfile.is_zipfile(path):
            return _read_keras_zip(path)
        with h5py.File(path, "r") as f:
            return _read_legacy_h5(path, f)
    except SOCModelError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError, zipfile.BadZipFile) as e:
        msg = " ".join(str(e).split())[:200]
        raise SOCModelError(f"{path}: cannot read as a Keras model file ({type(e).__name__}: {msg}); the file is "
                            f"corrupt or not a Keras .h5/.keras model: re-download or re-export it") from None


def _keras_config(model: SOCLSTM) -> dict:
    """A Sequential config both tf-keras 2.x and Keras 3 load: only keys both accept (no time_major,
    no implementation), the rest left to their defaults. Time dimension None: any window length."""
    def lstm(name, seq):
        return {"class_name": "LSTM", "config": {"name": name, "trainable": True, "dtype": "float32",
                "units": model.hidden, "activation": "selu", "recurrent_activation": "sigmoid", "use_bias": True,
                "return_sequences": seq, "return_state": False, "go_backwards": False, "stateful": False,
                "unroll": False, "unit_forget_bias": True, "dropout": 0.0, "recurrent_dropout": 0.0}}

    def dense(name, units, act):
        return {"class_name": "Dense", "config": {"name": name, "trainable": True, "dtype": "float32",
                "units": units, "activation": act, "use_bias": True}}
    return {"class_name": "Sequential", "config": {"name": "sequential", "layers": [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, None, model.n_features],
                                                "dtype": "float32", "sparse": False, "ragged": False,
                                                "name": "input_1"}},
        lstm("lstm", True), lstm("lstm_1", False),
        dense("dense", model.hidden, "selu"), dense("dense_1", model.hidden // 2, "selu"),
        dense("dense_2", 1, "linear")]}}


def save_keras_h5(model: SOCLSTM, path: str | Path) -> None:
    """Write the model as a legacy Keras 2 HDF5 file (the layout of the authors' 2021 file); atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    layers = [("lstm", [("lstm_cell/kernel", sd["lstm1.kernel"]), ("lstm_cell/recurrent_kernel",
                                                                     sd["lstm1.recurrent_kernel"]),
                        ("lstm_cell/bias", sd["lstm1.bias"])]),
              ("lstm_1", [("lstm_cell/kernel", sd["lstm2.kernel"]), ("lstm_cell/recurrent_kernel",
                                                                       sd["lstm2.recurrent_kernel"]),
                          ("lstm_cell/bias", sd["lstm2.bias"])])]
    for name, key in (("dense", "dense1"), ("dense_1", "dense2"), ("dense_2", "dense3")):
        layers.append((name, [("kernel", sd[f"{key}.weight"].T), ("bias", sd[f"{key}.bias"])]))
    fixed = lambda xs: np.array([x.encode() for x in xs])  # fixed-length bytes, as Keras 2 wrote them

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["keras_version"] = "2.15.0".encode()
            f.attrs["backend"] = "tensorflow".encode()
            f.attrs["model_config"] = json.dumps(_keras_config(model)).encode()
            g = f.create_group("model_weights")
            g.attrs["keras_version"] = "2.15.0".encode()
            g.attrs["backend"] = "tensorflow".encode()
            g.attrs["layer_names"] = fixed([n for n, _ in layers])
            for name, ws in layers:
                lg = g.create_group(name)
                full = [f"{name}/{w}:0" for w, _ in ws]
                lg.attrs["weight_names"] = fixed(full)
                for n, (_, a) in zip(full, ws):
                    lg.create_dataset(n, data=np.ascontiguousarray(a, np.float32))
    atomic_write(path, write)


# -----------------------------------------------------------------------------
# charge counting: how far the current moves the SOC, in physical units from the data's scaler

STEP_S = 0.1   # seconds per step (the LG data's 10 Hz)


def check_scaler(scaler, source) -> None:
    """Raise SOCModelError (naming source, e.g. the sidecar's path) unless scaler holds what charge counting needs:
    min and max of V, I, T and capacity_ah per temperature class ("0degC": Ah, ...)."""
    fix = "pass the data's .json sidecar (e.g. data/lg_600_data.json), whose scaler records capacity_ah"
    if not isinstance(scaler, dict):
        raise SOCModelError(f"{source}: no scaler; {fix}")
    for key in ("min", "max"):
        v = scaler.get(key)
        if not (isinstance(v, list) and len(v) >= 3 and all(isinstance(a, (int, float)) for a in v[:3])):
            raise SOCModelError(f"{source}: the scaler's {key!r} is not a list of V, I, T values; {fix}")
    if not scaler["max"][1] > scaler["min"][1]:
        raise SOCModelError(f"{source}: the scaler's current range is empty; {fix}")
    cap = scaler.get("capacity_ah")
    if not isinstance(cap, dict) or not cap:
        raise SOCModelError(f"{source}: the scaler has no capacity_ah; {fix}")
    for k, q in cap.items():
        try:
            float(str(k).removesuffix("degC"))
        except ValueError:
            raise SOCModelError(f"{source}: capacity_ah key {k!r} is not a temperature like '25degC'; {fix}") from None
        if not (isinstance(q, (int, float)) and np.isfinite(q) and q > 0):
            raise SOCModelError(f"{source}: capacity_ah[{k!r}] = {q!r} is not a capacity in Ah > 0; {fix}")


def sequence_capacity_ah(sequences: np.ndarray, scaler: dict) -> np.ndarray:
    """Scaled V, I, T sequences [n, T, >=3] -> [n] float64 capacity Q (Ah) of each: the scaler's capacity_ah of the
    temperature class nearest the sequence's mean temperature (NaN where that mean is not finite)."""
    lo, hi = float(scaler["min"][2]), float(scaler["max"][2])
    temp = np.asarray(sequences)[..., 2].astype(np.float64).mean(1) * (hi - lo) + lo
    classes = sorted((float(str(k).removesuffix("degC")), float(q)) for k, q in scaler["capacity_ah"].items())
    centres, q = np.array([c for c, _ in classes]), np.array([q for _, q in classes])
    nearest = np.abs(np.nan_to_num(temp, nan=0.0)[:, None] - centres).argmin(1)
    return np.where(np.isfinite(temp), q[nearest], np.nan)


def counted_soc(sequences: np.ndarray, scaler: dict, step_s: float = STEP_S) -> np.ndarray:
    """Scaled V, I, T sequences [n, T, >=3] -> [n, T] float64: the charge counted from step 0 to step t, in SOC
    units, sum over k < t of I_k * step_s / (3600 Q) (I in A, discharge negative; Q from sequence_capacity_ah).
    Column 0 is 0. The same count as metrics.coulomb_gap, so labels made from it have no coulomb gap."""
    lo, hi = float(scaler["min"][1]), float(scaler["max"][1])
    current = np.asarray(sequences)[..., 1].astype(np.float64) * (hi - lo) + lo
    charge = np.zeros(current.shape, np.float64)
    np.cumsum(current[:, :-1] * step_s, axis=1, out=charge[:, 1:])
    return charge / (3600.0 * sequence_capacity_ah(sequences, scaler))[:, None]


FUSED_READINGS = 4   # estimator readings per sequence for fused labels (chosen: docs/experiments/2026-12-08-fused-labels.md)


def reading_steps(steps: int, window: int, readings: int) -> np.ndarray:
    """The steps t_k whose windows give the fused labels' readings: `readings` steps evenly spaced from the first
    labellable step (window - 1) to the last (steps - 1), both included; fewer where the sequence has fewer."""
    if readings < 1:
        raise SOCModelError(f"readings {readings}: need at least one estimator reading per sequence")
    return np.unique(np.linspace(window - 1, steps - 1, readings).round().astype(int))


# -----------------------------------------------------------------------------
# labelling: the public entry point for the trainer, generate.py, evaluation and users

def _keras_lstm_without_time_major():
    """Keras 3 refuses the `time_major` key that TF 2.x wrote into every LSTM config (keras-team/keras#20750)."""
    import keras  # only here: importing soc_estimator must not pull in TensorFlow/Keras

    class LSTM(keras.layers.LSTM):
        def __init__(self, *args, time_major=False, implementation=None, **kwargs):
            super().__init__(*args, **kwargs)
    return keras, LSTM


class GraphedForward:
    """The SOC network's forward for one batch shape, captured once as a CUDA graph and replayed. Eagerly, each of
    the window's steps launches about ten small kernels per layer, and labelling runs at the CPU's launch rate
    (about 25k windows/s on an H100, README: Performance); a replay launches them all at once. Rows are
    independent, so a shorter batch fills the first rows of the captured one."""

    def __init__(self, model: nn.Module, shape: tuple[int, int, int], device: torch.device):
        self.x = torch.zeros(shape, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):   # warm-up on a side stream, as torch.cuda.graph requires
            for _ in range(2):
                model(self.x)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.y = model(self.x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.x[:len(x)].copy_(x)
        self.graph.replay()
        return self.y[:len(x)]


class SOCEstimator:
    """Labels scaled V, I, T sequences with SOC by sliding the estimator's window over them. On CUDA, a labelling
    of more than one batch replays a CUDA graph of the network (cuda_graphs=False: eager, as before)."""

    def __init__(self, model, path: Path, device: torch.device, backend: str, cuda_graphs: bool = True):
        self.model, self.path, self.device, self.backend = model, path, device, backend
        self.n_features = model.n_features if backend == "torch" else int(model.input_shape[-1])
        self.cuda_graphs, self._graphs = cuda_graphs, {}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", backend: str = "torch") -> "SOCEstimator":
        path = Path(path)
        if backend == "torch":
            model = load_keras_h5(path)
            try:
                dev = torch.device(device)
                model = model.to(dev)
            except (RuntimeError, AssertionError) as e:  # e.g. "cuda" on a machine without a GPU
                raise SOCModelError(f"{path}: cannot use device {str(device)!r} ({str(e).splitlines()[0]}); "
                                    f"pick an available one, e.g. device='cpu'") from None
            return cls(model.eval(), path, dev, backend)
        if backend != "keras":
            raise SOCModelError(f"{path}: unknown SOC backend {backend!r}; use 'torch' or 'keras'")
        load_keras_h5(path)  # same one-line errors as the torch path for missing/corrupt/foreign files
        try:
            keras, LSTM = _keras_lstm_without_time_major()
        except ImportError as e:
            raise SOCModelError(f"{path}: the keras backend needs TensorFlow/Keras ({e}); "
                                f"pip install -r requirements-keras.txt, or use backend='torch'") from None
        try:
            model = keras.models.load_model(path, custom_objects={"LSTM": LSTM}, compile=False)
        except Exception as e:  # Keras raises many types; the user needs the message, not the stack
            msg = " ".join(str(e).split())[:200]
            raise SOCModelError(f"{path}: Keras could not load it ({type(e).__name__}: {msg}); "
                                f"try backend='torch'") from None
        return cls(model, path, torch.device("cpu"), backend)

    def _predict(self, x: torch.Tensor, graph_shape: tuple[int, int, int] | None = None) -> np.ndarray:
        if self.backend == "torch" and graph_shape is not None:
            if graph_shape not in self._graphs:
                self._graphs[graph_shape] = GraphedForward(self.model, graph_shape, self.device)
            return self._graphs[graph_shape](x).squeeze(-1).float().cpu().numpy()
        if self.backend == "torch":
            return self.model(x).squeeze(-1).float().cpu().numpy()
        return np.asarray(self.model.predict_on_batch(x.cpu().numpy()), np.float32).reshape(-1)

    def label(self, sequences: np.ndarray, window: int = 300, batch_size: int = 2048,
              progress: bool = False) -> np.ndarray:
        """sequences float [n, T, 3] scaled V,I,T -> float32 [n, T - window + 1]; column k = SOC at the end of the
        window ending at step window-1+k. Streams windows in batches (bounded memory whatever n); raises
        SOCModelError for window > T, wrong feature count, NaN/inf."""
        seq = np.asarray(sequences)
        if seq.ndim != 3 or seq.shape[2] != self.n_features:
            raise SOCModelError(f"{self.path}: sequences have shape {seq.shape}, expected [n, T, "
                                f"{self.n_features}] (scaled V, I, T)")
        n, T, _ = seq.shape
        if not 1 <= window <= T:
            raise SOCModelError(f"{self.path}: window {window} does not fit sequences of {T} steps; "
                                f"use a window between 1 and {T}")
        if batch_size < 1:
            raise SOCModelError(f"{self.path}: batch_size {batch_size} must be positive")
        if not np.isfinite(seq).all():
            raise SOCModelError(f"{self.path}: sequences contain NaN/inf; clean or drop those sequences first")
        k = T - window + 1
        out = np.empty((n, k), np.float32)
        # the sequences themselves are small (4000 x 600 x 3 float32 = 29 MB): keep them on the device whole and
        # cut windows from a strided view, so only one batch of windows is ever materialised
        x = torch.from_numpy(np.ascontiguousarray(seq, np.float32)).to(self.device)
        views = x.unfold(1, window, 1)  # [n, k, 3, window], no copy
        flat = out.reshape(-1)
        starts = range(0, n * k, batch_size)
        graphed = self.cuda_graphs and self.backend == "torch" and self.device.type == "cuda" and len(starts) > 1
        graph_shape = (batch_size, window, self.n_features) if graphed else None
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="SOC labelling", unit="batch")
        with torch.inference_mode():
            for s in starts:
                idx = torch.arange(s, min(s + batch_size, n * k), device=self.device)
                batch = views[idx // k, idx % k].transpose(1, 2)  # [b, window, 3]
                flat[s:s + len(idx)] = self._predict(batch.contiguous(), graph_shape)
        return out

    def fused_labels(self, sequences: np.ndarray, scaler: dict, window: int = 300, readings: int = FUSED_READINGS,
                     batch_size: int = 2048, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Fused labels: SOC at every step that obeys charge counting, its level from a few estimator readings.
        sequences float [n, T, 3] scaled V, I, T -> (soc float32 [n, T], spread float32 [n]):
        soc[:, t] = s0 + counted_soc[:, t], s0 the median over the readings k of (reading_k - counted_soc[:, t_k]),
        reading_k the estimator's SOC for the window ending at step t_k (steps from reading_steps); spread: the root
        mean square of the readings' levels about s0, in SOC units (0 with one reading): how far the estimator
        disagrees with the charge count, one disagreeing reading included (the median ignores it, the spread must
        not). A row with NaN/inf gets NaN labels and NaN spread (a diverged generator's sequence is not an error);
        shapes are checked as label() checks them."""
        seq = np.asarray(sequences)
        if seq.ndim != 3 or seq.shape[2] != self.n_features:
            raise SOCModelError(f"{self.path}: sequences have shape {seq.shape}, expected [n, T, "
                                f"{self.n_features}] (scaled V, I, T)")
        if not 1 <= window <= seq.shape[1]:
            raise SOCModelError(f"{self.path}: window {window} does not fit sequences of {seq.shape[1]} steps; "
                                f"use a window between 1 and {seq.shape[1]}")
        n, T, _ = seq.shape
        soc, spread = np.full((n, T), np.nan, np.float32), np.full(n, np.nan, np.float32)
        ok = np.isfinite(seq).all((1, 2))
        if not ok.any():
            return soc, spread
        good = seq[ok]
        steps = reading_steps(T, window, readings)
        counted = counted_soc(good, scaler)
        # each reading is one window of label(): the same network and batching, on the window ending at t_k
        read = np.concatenate([self.label(good[:, t - window + 1:t + 1], window, batch_size, progress)
                               for t in steps], 1).astype(np.float64)
        level = read - counted[:, steps]
        s0 = np.median(level, 1)
        soc[ok] = s0[:, None] + counted
        spread[ok] = np.sqrt(np.mean((level - s0[:, None]) ** 2, 1))
        return soc, spread


# -----------------------------------------------------------------------------
# command line: label a .npy of sequences, or measure labelling throughput

def bench(est: SOCEstimator, n: int, steps: int, window: int, batch_size: int) -> dict:
    import time
    seq = np.random.default_rng(0).random((n, steps, est.n_features), dtype=np.float32)
    est.label(seq[:1, :window], window)  # warm-up
    t = time.perf_counter()
    est.label(seq, window, batch_size)
    dt = time.perf_counter() - t
    w = n * (steps - window + 1)
    return {"sequences": n, "steps": steps, "window": window, "windows": w, "seconds": dt,
            "windows_per_s": w / dt, "device": str(est.device), "backend": est.backend,
            "threads": torch.get_num_threads()}


def read_sequences(path: str) -> np.ndarray:
    """A .npy array, read without pickle (a pickled file could run code)."""
    if not path.endswith(".npy"):
        raise SOCModelError(f"{path}: not a .npy file; save the sequences with numpy.save as [n, T, >=3]")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        raise SOCModelError(f"{path}: missing, damaged or not a plain numeric .npy array; save the sequences "
                            f"with numpy.save as float [n, T, >=3]") from None


def read_scaler(path: str) -> dict:
    """The scaler (with capacity_ah) from a data sidecar .json, the sidecar of a data .npy, or a run's config.json."""
    src = Path(path)
    if src.suffix == ".npy":
        src = src.with_suffix(".json")
    fix = "pass the data's .json sidecar, e.g. --data data/lg_600_data.json"
    try:
        meta = json.loads(src.read_text())
    except FileNotFoundError:
        raise SOCModelError(f"{src}: not found; {fix}") from None
    except (OSError, ValueError) as e:
        raise SOCModelError(f"{src}: not readable as JSON ({type(e).__name__}); {fix}") from None
    scaler = meta.get("scaler") if isinstance(meta, dict) else None
    check_scaler(scaler, src)
    return scaler


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="soc_estimator.py", description="Label scaled V,I,T sequences with the LSTM SOC estimator. "
                      "--labels estimator (the paper): the estimator's reading at every step from window-1 on, "
                      "[n, T - window + 1]. --labels fused: every step, [n, T], the label's change from step to "
                      "step the charge counted from the current, its level the median of --readings estimator "
                      "readings; the readings' spread about that level (root mean square, SOC units) is "
                      "written to <output>.spread.npy, float32 [n] (NaN rows of the input are refused).")
    p.add_argument("--model", default="soc_models/lg_positive_temp_300_steps.h5")
    p.add_argument("--input", help=".npy float [n, T, >=3]: columns 0..2 = scaled V, I, T")
    p.add_argument("--output", help=".npy to write: float32 SOC, [n, T - window + 1] (estimator) or [n, T] (fused; "
                                    "the spread [n] goes to <output stem>.spread.npy)")
    p.add_argument("--labels", choices=["estimator", "fused"], default="estimator",
                   help="estimator: the paper's per-step readings (default); fused: charge counting + readings")
    p.add_argument("--data", metavar="JSON", help="fused: the data's .json sidecar (or a run's config.json) whose "
                                                  "scaler gives physical units and capacity_ah per temperature")
    p.add_argument("--readings", type=int_at_least(1), default=FUSED_READINGS,
                   help=f"fused: estimator readings per sequence, evenly spaced from step window-1 to the last "
                        f"(default {FUSED_READINGS})")
    p.add_argument("--window", type=int_at_least(1), default=300)
    p.add_argument("--batch-size", type=int_at_least(1), default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=["torch", "keras"], default="torch")
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--bench", type=int_at_least(0), default=0, metavar="N",
                   help="instead of labelling, time N random sequences of --bench-steps steps")
    p.add_argument("--bench-steps", type=int_at_least(1), default=600)
    a = p.parse_args(argv)
    return cli(lambda: label_command(a))


def check_input(path: str, seq: np.ndarray, n_features: int, window: int) -> None:
    """The command's refusals of its input, naming the file."""
    if seq.ndim != 3 or seq.shape[2] < n_features or not np.issubdtype(seq.dtype, np.number):
        raise SOCModelError(f"{path}: shape {seq.shape} ({seq.dtype}), expected float [n, T, >={n_features}] "
                            f"(scaled V, I, T first); save the sequences as such")
    if seq.shape[0] == 0:
        raise SOCModelError(f"{path}: holds no sequences; pass at least one")
    if seq.shape[1] < window:
        raise SOCModelError(f"{path}: sequences of {seq.shape[1]} steps are shorter than the {window}-step window; "
                            f"pass longer sequences or a smaller --window")
    bad = ~np.isfinite(seq[..., :n_features]).all((1, 2))
    if bad.any():
        raise SOCModelError(f"{path}: {int(bad.sum())} sequence(s) hold NaN/inf (first: row {int(bad.argmax())}); "
                            f"drop or clean those rows first")


def spread_path(out: Path) -> Path:
    """Where --labels fused writes the spread: soc.npy -> soc.spread.npy."""
    return out.with_name(out.stem + ".spread.npy")


def label_command(a: argparse.Namespace) -> None:
    if not a.bench and (not a.input or not a.output):
        raise SOCModelError("--input and --output are required (or --bench N)")
    if a.labels == "fused" and not a.bench and not a.data:
        raise SOCModelError("--labels fused needs --data: the data's .json sidecar with the scaler and capacity_ah, "
                            "e.g. --data data/lg_600_data.json")
    out = None
    if not a.bench:   # every input checked before the model runs
        out = Path(a.output if a.output.endswith(".npy") else a.output + ".npy")
        if not out.parent.is_dir():
            raise SOCModelError(f"{out.parent}: output folder does not exist; create it first")
        seq = read_sequences(a.input)
        scaler = read_scaler(a.data) if a.labels == "fused" else None
    if a.threads:
        torch.set_num_threads(a.threads)
    est = SOCEstimator.load(a.model, a.device, a.backend)
    if a.bench:
        print(json.dumps(bench(est, a.bench, a.bench_steps, a.window, a.batch_size)))
        return
    check_input(a.input, seq, est.n_features, a.window)
    seq = seq[..., :est.n_features]  # e.g. [n, T, 4] V, I, T, SOC data: label from V, I, T
    if a.labels == "estimator":
        atomic_npy(out, est.label(seq, a.window, a.batch_size, progress=True))
        print(f"wrote {out}")
        return
    soc, spread = est.fused_labels(seq, scaler, a.window, a.readings, a.batch_size)
    atomic_npy(spread_path(out), spread)
    atomic_npy(out, soc)
    print(f"wrote {out} and {spread_path(out)}")


if __name__ == "__main__":
    sys.exit(main())
