"""A cell model of the LG 18650HG2 fitted to the training cycles, and the tester and sensors that logged them.

The physics head of the generator (`--generator-head physics`) builds V, I and T from what a drive cycle is: a
power demand held for about a second at a time. The tester turns the demand into a current (I = P / V, reached
within a few steps), the cell answers with its voltage (an equivalent circuit: open-circuit voltage by SOC and
temperature, a series resistance and RC pairs), the SOC follows the charge, and the logger reads every value on
its sensor's grain (2.55 mA, 0.17 mV, 0.105 degC). What the generator still learns: the demand, the SOC and
temperature it starts from, and a small voltage residual.

    python cell_model.py --raw-dir <folder with 0degC/ 10degC/ 25degC/> --out data/lg_cell_model.json

fits the model on the paper's 18 training files (least squares; about a minute) and writes its parameters.

Fit, per temperature class c (its files' mean temperature t_c), on every discharge row:
    V_t = OCV_c(SOC_t) + k_c (T_t - t_c) + R0_c(SOC_t, T_t) i_t + sum_k R_k,c(T_t) x_k,t
where i is the current as the voltage sensor sees it (a first-order lag of the logged current, BETA per step:
the logged voltage trails a current step by about a sample), x_k its RC filters (time constants RC_TAUS), OCV and
R0 piecewise linear in SOC and every resistance linear in T - t_c. Other temperatures: the classes' parameters
blended linearly in temperature (held beyond the outer classes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import OneLineParser, UserError, atomic_json, cli, project_default

OCV_KNOTS = (0, .005, .01, .02, .03, .05, .07, .1, .13, .16, .2, .25, .3, .35, .4, .45, .5, .55, .6, .65, .7,
             .75, .8, .85, .9, .95, 1.0)   # dense near empty, where the open-circuit voltage falls fast
R_KNOTS = (0, .02, .05, .1, .2, .35, .5, .7, 1.0)
RC_TAUS = (0.5, 5.0, 60.0)   # s: chosen by the fit's residual among 0.1-2, 1-20 and 10-160 s
BETA = 0.6                   # the voltage sensor's lag per step (fit residual and the step response of 1-3 A jumps)
DT = 0.1                     # s per logged step
JUMP_BINS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)   # A: current steps, for the tester's lag
SUBSAMPLE = 5                # rows per least-squares row: the RC filters run on every row, the fit on every 5th


# ----------------------------------------------------------------------------------------------------------------
# fitting (numpy)

def hat_basis(x: np.ndarray, knots) -> np.ndarray:
    """[n] -> [n, len(knots)]: piecewise-linear interpolation weights (clamped at the ends)."""
    knots = np.asarray(knots, np.float64)
    x = np.clip(x, knots[0], knots[-1])
    j = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, len(knots) - 2)
    w = (x - knots[j]) / (knots[j + 1] - knots[j])
    basis = np.zeros((len(x), len(knots)))
    basis[np.arange(len(x)), j] = 1 - w
    basis[np.arange(len(x)), j + 1] = w
    return basis


def first_order(x: np.ndarray, gain: float, start: float | None = None) -> np.ndarray:
    """y_t = y_{t-1} + gain (x_t - y_{t-1}), starting at rest at x_0 (or start)."""
    from scipy.signal import lfilter
    y0 = x[0] if start is None else start
    return lfilter([gain], [1, -(1 - gain)], x, zi=[(1 - gain) * y0])[0]


def design(a: np.ndarray, t_c: float) -> np.ndarray:
    """One file's discharge rows [rows, 4] (V, I, T, SOC) -> the least-squares design matrix of the docstring."""
    current, temp, soc = a[:, 1], a[:, 2], a[:, 3]
    seen = first_order(current, BETA)
    d_t = (temp - t_c)[:, None]
    series = hat_basis(soc, R_KNOTS) * seen[:, None]
    rc = np.stack([first_order(seen, 1 - np.exp(-DT / tau)) for tau in RC_TAUS], axis=1)
    return np.hstack([hat_basis(soc, OCV_KNOTS), series, rc, d_t, series * d_t, rc * d_t])


def fit_class(arrays: list[np.ndarray]) -> dict:
    """The model of one temperature class from its files' discharge rows."""
    t_c = float(np.mean([a[:, 2].mean() for a in arrays]))
    x = np.vstack([design(a, t_c)[::SUBSAMPLE] for a in arrays])
    y = np.concatenate([a[::SUBSAMPLE, 0] for a in arrays])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    n_o, n_r, n_k = len(OCV_KNOTS), len(R_KNOTS), len(RC_TAUS)
    parts = np.split(coef, np.cumsum([n_o, n_r, n_k, 1, n_r]))
    return {"temperature_c": t_c, "ocv_v": parts[0].tolist(), "r0_ohm": parts[1].tolist(),
            "rc_ohm": parts[2].tolist(), "ocv_v_per_degc": float(parts[3][0]),
            "r0_ohm_per_degc": parts[4].tolist(), "rc_ohm_per_degc": parts[5].tolist(),
            "fit_rmse_mv": float(np.sqrt(np.mean((y - x @ coef) ** 2)) * 1000)}


def tester_lag(arrays: list[np.ndarray]) -> list[float]:
    """The share of a current step the tester reaches in the first logged step, by step size (JUMP_BINS): the
    median over the training files' setpoint changes (a step after a quiet one, its size the change 6 steps on)."""
    bins = np.asarray(JUMP_BINS)
    shares = [[] for _ in bins[:-1]]
    for a in arrays:
        current = a[:, 1]
        d = np.diff(current)
        onsets = np.flatnonzero((np.abs(d[2:-12]) > bins[0]) & (np.abs(d[1:-13]) < 0.02)) + 2
        total = current[onsets + 6] - current[onsets]
        keep = np.abs(total) > bins[0]
        share, size = (current[onsets + 1] - current[onsets])[keep] / total[keep], np.abs(total[keep])
        for k in range(len(bins) - 1):
            shares[k] += share[(size >= bins[k]) & (size < bins[k + 1])].tolist()
    return [float(np.clip(np.median(s), 0.05, 1.0)) if len(s) else 1.0 for s in shares]


def hold_steps(arrays: list[np.ndarray]) -> tuple[int, float]:
    """How long the tester holds a power setpoint, in steps, and the share of setpoint changes that come after that
    many steps: the drive cycles are 1 Hz tables, logged at 10 Hz (a change after a quiet step; a longer spacing is
    a repeat of one value)."""
    spacing = []
    for a in arrays:
        d = np.abs(np.diff(a[:, 1]))
        onsets = np.flatnonzero((d[1:] > 0.05) & (d[:-1] < 0.02)) + 1
        spacing += np.diff(onsets).tolist()
    counts = np.bincount(np.asarray(spacing, int), minlength=2)
    counts[:2] = 0
    return int(counts.argmax()), float(counts.max() / counts.sum())


def sensor_lsb(arrays: list[np.ndarray]) -> list[float]:
    """The grain each sensor logs in (V, A, degC): the mean of the steps around the most common small step (values
    are rounded to 5 decimals, so one grain shows as e.g. 0.00255 / 0.00256 A, 0.00016 / 0.00017 V)."""
    lsb = []
    for column in range(3):
        steps = np.round(np.concatenate([np.abs(np.diff(a[:, column])) for a in arrays]), 5)
        steps = steps[steps > 0]
        values, counts = np.unique(steps[steps <= np.quantile(steps, 0.5)], return_counts=True)
        mode = values[counts.argmax()]
        lsb.append(float(steps[(steps > 0.7 * mode) & (steps < 1.3 * mode)].mean()))
    return lsb


def fit(raw_dir: Path) -> dict:
    """The whole model from the paper's training files under raw_dir."""
    import lg_dataset
    entries = lg_dataset.file_list("train")
    lg_dataset.check_raw_dir(raw_dir, entries)
    found, arrays, hashes, capacities = lg_dataset.load_files(raw_dir, entries, required=True)
    by_class: dict[str, list[np.ndarray]] = {}
    for entry, a in zip(found, arrays):
        by_class.setdefault(entry.split("/")[0], []).append(a)
    hold = hold_steps(arrays)
    return {
        "what": "equivalent-circuit model of the LG 18650HG2 and its tester/logger, fitted to the paper's training "
                "drive cycles (cell_model.py)",
        "ocv_knots": list(OCV_KNOTS), "r_knots": list(R_KNOTS), "rc_taus_s": list(RC_TAUS), "beta": BETA,
        "dt_s": DT, "classes": {c: fit_class(a) for c, a in by_class.items()},
        "capacity_ah": lg_dataset.capacity_per_temp(capacities),
        "tester": {"jump_bins_a": list(JUMP_BINS), "first_step_share": tester_lag(arrays),
                   "hold_steps": hold[0], "hold_share": hold[1]},
        "sensor_lsb": sensor_lsb(arrays), "sensor_units": ["V", "A", "degC"],
        "power_range_w": [float(min((a[:, 0] * a[:, 1]).min() for a in arrays)),
                          float(max((a[:, 0] * a[:, 1]).max() for a in arrays))],
        "files": found, "inputs_sha256": hashes, "data": lg_dataset.CITATION,
    }


# ----------------------------------------------------------------------------------------------------------------
# the model in torch (differentiable, for the generator's head)

def interpolate(x: torch.Tensor, knots: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Piecewise-linear values[b, :] at x[b] (clamped) -> (value [B], slope [B])."""
    x = x.clamp(float(knots[0]), float(knots[-1]))
    j = (torch.searchsorted(knots, x.detach().contiguous(), right=True) - 1).clamp(0, len(knots) - 2)
    x0, x1 = knots[j], knots[j + 1]
    y0, y1 = values.gather(1, j[:, None])[:, 0], values.gather(1, (j + 1)[:, None])[:, 0]
    slope = (y1 - y0) / (x1 - x0)
    return y0 + slope * (x - x0), slope


class CellModel(nn.Module):
    """The fitted model (fit()'s dict) as buffers: no trainable parameters, nothing in a state dict."""

    def __init__(self, params: dict):
        super().__init__()
        classes = sorted(params["classes"].values(), key=lambda c: c["temperature_c"])
        buf = lambda name, value: self.register_buffer(name, torch.tensor(value, dtype=torch.float32),
                                                       persistent=False)
        buf("class_temperature", [c["temperature_c"] for c in classes])
        for key in ("ocv_v", "r0_ohm", "rc_ohm", "r0_ohm_per_degc", "rc_ohm_per_degc"):
            buf(key, [c[key] for c in classes])
        buf("ocv_v_per_degc", [c["ocv_v_per_degc"] for c in classes])
        buf("ocv_knots", params["ocv_knots"])
        buf("r_knots", params["r_knots"])
        buf("rc_gain", [1 - np.exp(-params["dt_s"] / tau) for tau in params["rc_taus_s"]])
        buf("jump_bins", params["tester"]["jump_bins_a"])
        buf("first_step_share", params["tester"]["first_step_share"])
        self.beta, self.dt = float(params["beta"]), float(params["dt_s"])

    def blend(self, temperature: torch.Tensor) -> torch.Tensor:
        """[B] mean temperatures (degC) -> [B, classes] weights: linear between the classes' temperatures."""
        t = self.class_temperature
        x = temperature.clamp(float(t[0]), float(t[-1]))
        j = (torch.searchsorted(t, x.detach().contiguous(), right=True) - 1).clamp(0, len(t) - 2)
        w = (x - t[j]) / (t[j + 1] - t[j])
        weights = torch.zeros(len(x), len(t), device=x.device, dtype=x.dtype)
        weights.scatter_(1, j[:, None], (1 - w)[:, None])
        return weights.scatter_add(1, (j + 1)[:, None], w[:, None])

    def at(self, temperature: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each sequence's parameters at its mean temperature [B] (degC): the classes' linear models, blended."""
        w = self.blend(temperature)
        d_t = temperature[:, None] - self.class_temperature[None]   # [B, classes]
        return {"ocv": w @ self.ocv_v + (w * d_t * self.ocv_v_per_degc).sum(1, keepdim=True),
                "r0": torch.einsum("bc,bck->bk", w, self.r0_ohm + d_t[..., None] * self.r0_ohm_per_degc),
                "rc": torch.einsum("bc,bck->bk", w, self.rc_ohm + d_t[..., None] * self.rc_ohm_per_degc)}

    def step_share(self, gap: torch.Tensor) -> torch.Tensor:
        """The share of the gap to the commanded current the tester closes in one step (by the gap's size)."""
        centres = (self.jump_bins[:-1] * self.jump_bins[1:]).sqrt()
        share, _ = interpolate(gap.abs().log(), centres.log(), self.first_step_share.expand(len(gap), -1))
        return share

    def forward(self, power: torch.Tensor, soc0: torch.Tensor, temperature: torch.Tensor, current0: torch.Tensor,
                capacity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """power [B, T] W demanded (discharge negative), soc0 [B], temperature [B] degC (the window's mean),
        current0 [B] A (the current before the window, which the RC pairs and the tester start from, at rest),
        capacity [B] Ah -> (current [B, T] A, voltage [B, T] V, soc [B, T]). Within a minute SOC moves by about 1 %,
        so the open-circuit voltage follows it along its slope at soc0 and the series resistance is soc0's."""
        p = self.at(temperature)
        ocv0, ocv_slope = interpolate(soc0, self.ocv_knots, p["ocv"])
        r0, _ = interpolate(soc0, self.r_knots, p["r0"])
        rc, gain = p["rc"], self.rc_gain
        seen, rc_state, previous = current0, current0[:, None].expand(-1, len(gain)), current0
        charge = torch.zeros_like(soc0)
        # the voltage is linear in the new current: V = c0 + c1 i, so P = V i is a quadratic in i
        c1 = self.beta * (r0 + (rc * gain).sum(1))
        currents, voltages, socs = [], [], []
        for t in range(power.shape[1]):
            soc = soc0 + charge
            ocv = ocv0 + ocv_slope * (soc - soc0)
            c0 = ocv + (1 - self.beta) * (r0 * seen + (rc * gain).sum(1) * seen) + \
                (rc * (1 - gain) * rc_state).sum(1)
            # i = 2P / (c0 + sqrt(c0^2 + 4 c1 P)): the root near P / c0, without cancellation for small P
            root = torch.sqrt((c0 * c0 + 4 * c1 * power[:, t]).clamp_min(1e-4))
            command = 2 * power[:, t] / (c0 + root)
            gap = command - previous
            current = previous + self.step_share(gap.detach().abs().clamp_min(1e-4)) * gap
            seen = seen + self.beta * (current - seen)
            rc_state = rc_state + gain * (seen[:, None] - rc_state)
            voltages.append(ocv + r0 * seen + (rc * rc_state).sum(1))
            currents.append(current)
            socs.append(soc)
            charge = charge + current * self.dt / (3600 * capacity)
            previous = current
        return torch.stack(currents, 1), torch.stack(voltages, 1), torch.stack(socs, 1)


def on_grain(x: torch.Tensor, lsb: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """A sensor's reading: x (plus noise, in LSBs) rounded to the LSB grid; the gradient passes as through the
    identity (straight-through), since rounding's own is zero almost everywhere."""
    noisy = x if noise is None else x + noise * lsb
    return x + (torch.round(noisy / lsb) * lsb - x).detach()


# the sensors' noise before rounding, in LSBs (V, I, T): the smallest that gives the real share of logged steps
# that change (V 0.78, I 0.57, T 0.014 of the steps of the median window) in the probe of the dated docs entry
SENSOR_NOISE_LSB = (0.18, 0.25, 0.05)
RAW_CHANNELS = 4          # the generator's outputs that the head reads: power, temperature, residual, current
RESIDUAL_V = 0.02         # V: the largest voltage the generator may add about the cell model's (its fit: 8-16 mV RMS)
SOC_QUANTILES = 101       # the start-SOC distribution of each class, as this many quantiles


def soc_start(real: np.ndarray, classes, n_classes: int) -> list[list[float]]:
    """The SOC the real windows start from (real [n, T, >= 4], SOC in column 3), per class (classes: [n] class
    indices, numpy or torch; None: one row), as SOC_QUANTILES quantiles: the physics head draws each window's
    starting SOC from them."""
    classes = None if classes is None else np.asarray(classes)
    rows = [real[:, 0, 3]] if classes is None else [real[classes == k, 0, 3] for k in range(n_classes)]
    grid = np.linspace(0, 1, SOC_QUANTILES)
    return [np.quantile(np.asarray(r, np.float64), grid).tolist() for r in rows]


class PhysicsHead(nn.Module):
    """The generator's last LSTM outputs [B, T, RAW_CHANNELS] in -1..1 -> V, I, T [B, T, 3] scaled by the data's
    scaler, through the tester, the cell model and the sensors:
      0: the power demand, held for hold_steps steps from a phase of its own (a 1 Hz drive-cycle table); the
         tester turns it into a current (cell model), the current sensor reads it on its grain;
      1: the temperature (scaled, as the generator's own channel; the temperature head damps/bounds it first),
         read on the temperature sensor's grain;
      2: a voltage residual about the cell model's voltage, at most RESIDUAL_V and of mean zero over the window (the
         window's voltage level is the cell model's at its SOC, so that the SOC and the voltage agree as a cell's);
      3: the current before the window (its mean over the window; the RC pairs and the tester start there).
    The SOC a window starts from is not learned: it is drawn from the real windows' start-SOC distribution of its
    class (params["soc_start"], quantiles; soc_start()), so the synthetic data covers the SOC range as the real
    data does (left to the critic, which sees the SOC only through the voltage, every run so far narrowed it). The
    draw's uniform comes from z's first channel at the first step, which --generator-noise mixed / smooth hold over
    the whole window, so the LSTMs see it at every step. The hold's phase and the sensors' noise come from z's last
    four channels (i.i.d. N(0, 1) at every step). So a seed gives the same sequences on any device."""

    def __init__(self, params: dict, scaler: dict):
        super().__init__()
        self.cell = CellModel(params)
        lo, hi = params["power_range_w"]
        self.power_mid, self.power_half = (lo + hi) / 2, 1.15 * (hi - lo) / 2
        self.hold = int(params["tester"]["hold_steps"])
        self.lsb = params["sensor_lsb"]
        buf = lambda name, value: self.register_buffer(name, torch.tensor(value, dtype=torch.float32),
                                                       persistent=False)
        buf("scale_min", scaler["min"])
        buf("scale_max", scaler["max"])
        capacity = {float(k.removesuffix("degC")): q for k, q in params["capacity_ah"].items()}
        buf("capacity_t", sorted(capacity))
        buf("capacity_ah", [capacity[t] for t in sorted(capacity)])
        buf("soc_quantiles", params["soc_start"])   # [classes or 1, SOC_QUANTILES]

    def held(self, power: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """[B, T] demand -> the value at each hold's first step, held to the next: holds start at steps
        phase, phase + hold, ... (phase = floor(uniform x hold)); before the first, the window's first value."""
        steps = torch.arange(power.shape[1], device=power.device)[None]
        phase = (uniform * self.hold).long().clamp(0, self.hold - 1)[:, None]
        start = torch.where(steps >= phase, steps - (steps - phase) % self.hold, torch.zeros_like(steps))
        return power.gather(1, start)

    def start_soc(self, uniform: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """[B] uniforms -> SOC drawn from each sequence's class's start-SOC quantiles (linear between them)."""
        table = self.soc_quantiles[onehot.argmax(1)] if onehot.shape[1] else self.soc_quantiles[:1].expand(
            len(uniform), -1)
        grid = torch.linspace(0, 1, table.shape[1], device=table.device)
        soc, _ = interpolate(uniform, grid, table)
        return soc

    def forward(self, raw: torch.Tensor, noise: torch.Tensor, temperature_scaled: torch.Tensor, held_noise:
                torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """raw [B, T, RAW_CHANNELS], noise [B, T, 4] (i.i.d. N(0, 1)), temperature_scaled [B, T], held_noise [B]
        (N(0, 1), the LSTMs see it throughout), onehot [B, classes] (no columns: unconditional) -> [B, T, 3]."""
        lo, span = self.scale_min, self.scale_max - self.scale_min
        temperature = temperature_scaled * span[2] + lo[2]
        mean_t = temperature.mean(1)
        power = self.held(self.power_mid + self.power_half * raw[..., 0], torch.special.ndtr(noise[:, 0, 0]))
        soc0 = self.start_soc(torch.special.ndtr(held_noise), onehot)
        current0 = lo[1] + span[1] * (0.5 + 0.5 * raw[..., 3].mean(1))
        nearest = (mean_t.detach()[:, None] - self.capacity_t[None]).abs().argmin(1)
        current, voltage, _ = self.cell(power, soc0, mean_t, current0, self.capacity_ah[nearest])
        residual = raw[..., 2] - raw[..., 2].mean(1, keepdim=True)
        voltage = voltage + RESIDUAL_V * residual
        readings = [on_grain(x, lsb, sigma * noise[..., k + 1]) for k, (x, lsb, sigma) in
                    enumerate(zip((voltage, current, temperature), self.lsb, SENSOR_NOISE_LSB))]
        return (torch.stack(readings, -1) - lo) / span


# ----------------------------------------------------------------------------------------------------------------
# command line

def load(path: str | Path) -> dict:
    """A fitted model's JSON, checked enough that CellModel builds from it."""
    path = Path(path)
    try:
        params = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable cell model ({type(err).__name__}); rebuild it with python "
                        f"cell_model.py --raw-dir <LG folder> --out {path}") from None
    load_checked(params, path)
    return params


DEFAULT_PATH = "./data/lg_cell_model.json"


def for_run(args, scaler: dict | None, config: dict | None = None, run_path: str | Path | None = None,
            real: np.ndarray | None = None, classes: np.ndarray | None = None, n_classes: int = 0
            ) -> tuple[dict, dict] | None:
    """--generator-head physics: (the cell model's parameters with the data's start-SOC quantiles, the data's
    scaler) of a run, None without the flag. A saved run's (config: the config.json of the run folder run_path)
    are its own, as recorded; a new run's come from --cell-model, the data (real [n, T, 4], its classes) and the
    data's sidecar (scaler)."""
    if getattr(args, "generator_head", "none") != "physics":
        return None
    if getattr(args, "generator_noise", "step") == "step":
        raise UserError("--generator-head physics: draws each window's SOC from a noise channel held over the window, "
                        "which --generator-noise step does not hold; use --generator-noise mixed or smooth "
                        "(--preset cpu-physics does)")
    if config is not None:
        where = Path(run_path or ".") / "config.json"
        if not isinstance(config.get("cell_model"), dict) or not isinstance(config.get("scaler"), dict):
            raise UserError(f"{where}: a --generator-head physics run without its cell_model and scaler; restore "
                            f"the run's config.json (its generator cannot be rebuilt without them)")
        load_checked(config["cell_model"], where)
        if "soc_start" not in config["cell_model"]:
            raise UserError(f"{where}: its cell_model has no soc_start (written before the head drew the SOC from the "
                            f"data); train the run again with this version")
        return config["cell_model"], config["scaler"]
    if scaler is None:
        raise UserError(f"{args.data_path}: --generator-head physics needs the data's scaler (V, A, degC) from its "
                        f".json sidecar; rebuild the data with python lg_dataset.py, or drop --generator-head")
    params = load(project_default(args.cell_model, DEFAULT_PATH))
    params["soc_start"] = soc_start(real, classes, n_classes)
    return params, scaler


def load_checked(params, where) -> None:
    """params builds a CellModel, or one line naming where they came from."""
    try:
        CellModel(params)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as err:
        raise UserError(f"{where}: not a cell model written by cell_model.py ({type(err).__name__}); rebuild it "
                        f"with python cell_model.py --raw-dir <LG folder>") from None


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="cell_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw-dir", required=True, help="LG HG2 folder with 0degC/ 10degC/ 25degC/")
    p.add_argument("--out", default=DEFAULT_PATH, help="the model's JSON")
    a = p.parse_args(argv)

    def run() -> None:
        out = Path(a.out)
        if not out.parent.is_dir():
            raise UserError(f"{out.parent}: output folder does not exist; create it first")
        params = fit(Path(a.raw_dir))
        params["command"] = "python cell_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
        atomic_json(out, params)
        fits = ", ".join(f"{c} {m['fit_rmse_mv']:.1f} mV" for c, m in params["classes"].items())
        print(f"wrote {out} (fit RMSE over all discharge rows: {fits})")
    return cli(run)


if __name__ == "__main__":
    sys.exit(main())
