"""The cell model (cell_model.py): its fit on real rows, the torch model against real windows, the sensors' grain,
and the generator's physics head."""
import json

import numpy as np
import pytest
import torch

import cell_model
from cell_model import CellModel, PhysicsHead, on_grain
from helpers import ROOT, SCALER

SHIPPED = ROOT / "data" / "lg_cell_model.json"


@pytest.fixture(scope="module")
def params() -> dict:
    return cell_model.load(SHIPPED)


def real_windows(n: int = 12, start: int = 0) -> np.ndarray:
    """n real training windows [n, 600, 4] in physical units (V, A, degC) with their SOC."""
    data = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")
    x = np.array(data[start::len(data) // n][:n], np.float64)
    lo, hi = np.asarray(SCALER["min"]), np.asarray(SCALER["max"])
    x[..., :3] = x[..., :3] * (hi - lo) + lo
    return x


def test_fit_on_real_rows_writes_a_model_that_loads(mini_lists, tmp_path):
    out = tmp_path / "cell.json"
    assert cell_model.main(["--raw-dir", str(ROOT / "tests" / "fixtures" / "mini"), "--out", str(out)]) == 0
    params = cell_model.load(out)
    assert set(params["classes"]) == {"0degC", "10degC", "25degC"}
    for fitted in params["classes"].values():
        assert len(fitted["ocv_v"]) == len(cell_model.OCV_KNOTS) and np.isfinite(fitted["fit_rmse_mv"])
    lsb_v, lsb_i, lsb_t = params["sensor_lsb"]
    assert 0.1e-3 < lsb_v < 0.3e-3 and 2e-3 < lsb_i < 3e-3 and 0.09 < lsb_t < 0.12   # the loggers' grain
    assert params["tester"]["hold_steps"] == 10   # the drive cycles' 1 Hz tables at 10 Hz


def test_bad_raw_dir_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "cell.json"
    assert cell_model.main(["--raw-dir", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(cell_model.UserError, match="not a cell model"):
        cell_model.load(bad)


def test_shipped_fit_is_close_on_every_class(params):
    rmse = {c: m["fit_rmse_mv"] for c, m in params["classes"].items()}
    assert all(value < 20 for value in rmse.values()), rmse
    assert [m["temperature_c"] for m in params["classes"].values()] == sorted(
        m["temperature_c"] for m in params["classes"].values())


def settled_power(current: np.ndarray, voltage: np.ndarray) -> np.ndarray:
    """A real window's power demand: the power 6 steps into each hold (after the tester settles), held."""
    power, steps = current * voltage, len(current)
    changes = np.flatnonzero(np.abs(np.diff(current)) > 0.05) + 1
    starts = np.r_[0, changes[np.r_[True, np.diff(changes) > 3]] if len(changes) else [], steps].astype(int)
    out = np.empty(steps)
    for a, b in zip(starts[:-1], starts[1:]):
        out[a:b] = power[min(b - 1, a + 6)]
    return out


def test_model_follows_real_windows_from_their_power_demand(params):
    """Driven by a real window's power demand, starting from its SOC, the model gives the window's current and
    voltage: the voltage within a few tens of mV (the fit's RMSE), the current within a few hundred mA."""
    x = real_windows()
    model = CellModel(params)
    power = torch.tensor(np.stack([settled_power(w[:, 1], w[:, 0]) for w in x]), dtype=torch.float32)
    temperature = torch.tensor(x[..., 2].mean(1), dtype=torch.float32)
    capacity = torch.tensor([params["capacity_ah"][min(params["capacity_ah"], key=lambda c: abs(
        float(c.removesuffix("degC")) - t))] for t in temperature.tolist()])
    with torch.no_grad():
        current, voltage, soc = model(power, torch.tensor(x[:, 0, 3], dtype=torch.float32), temperature,
                                      torch.tensor(x[:, 0, 1], dtype=torch.float32), capacity)
    assert np.abs(voltage.numpy() - x[..., 0]).mean() < 0.025
    assert np.abs(current.numpy() - x[..., 1]).mean() < 0.1
    # the SOC is the charge counted from the current, step by step
    counted = np.cumsum(current.numpy()[:, :-1] * 0.1, axis=1) / (3600 * capacity.numpy()[:, None])
    np.testing.assert_allclose(soc.numpy()[:, 1:] - soc.numpy()[:, :1], counted, atol=1e-6)
    # and the demanded power is delivered once the tester has settled
    delivered = (current * voltage).numpy()
    settled = np.abs(np.diff(power.numpy(), axis=1, prepend=np.nan)) == 0
    settled[:, :10] = False
    assert np.median(np.abs(delivered - power.numpy())[settled]) < 0.05


def test_sensor_grain_and_straight_through_gradient():
    x = torch.linspace(3.0, 3.01, 101, requires_grad=True)
    lsb = 0.000168
    y = on_grain(x, lsb)
    grid = y.detach().numpy() / lsb
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)
    assert (y.detach() - x.detach()).abs().max() <= lsb / 2 + 1e-6   # float32 at 3 V: 2.4e-7 a step
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def with_soc_start(params: dict, tables: list[list[float]] | None = None) -> dict:
    """The shipped model with a start-SOC table, as a run records it (default: SOC uniform on 0..1, one class)."""
    return {**params, "soc_start": tables or [np.linspace(0, 1, cell_model.SOC_QUANTILES).tolist()]}


def test_physics_head_holds_the_demand_and_reads_on_grain(params):
    torch.manual_seed(0)
    head = PhysicsHead(with_soc_start(params), SCALER)
    b, t = 4, 120
    raw = (torch.rand(b, t, cell_model.RAW_CHANNELS) * 2 - 1).requires_grad_(True)
    noise = torch.randn(b, t, 4)
    out = head(raw, noise, torch.full((b, t), 0.9), torch.randn(b), torch.zeros(b, 0))
    assert out.shape == (b, t, 3) and torch.isfinite(out).all()
    lo, hi = np.asarray(SCALER["min"]), np.asarray(SCALER["max"])
    physical = out.detach().numpy() * (hi - lo) + lo
    for k, lsb in enumerate(params["sensor_lsb"]):   # every reading on its sensor's grain
        grid = physical[..., k] / lsb
        assert np.abs(grid - np.round(grid)).max() < 0.02
    # the demand changes only at the holds' starts: phase, phase + 10, ...
    uniform = torch.special.ndtr(noise[:, 0, 0])
    held = head.held(torch.randn(b, t), uniform).numpy()
    phase = (uniform.numpy() * head.hold).astype(int)
    for row, p in zip(held, phase):
        changes = np.flatnonzero(np.diff(row) != 0) + 1
        assert set(changes) <= set(range(p, t, head.hold))
    out.sum().backward()
    assert all(raw.grad[..., k].abs().sum() > 0 for k in (0, 2, 3))   # the temperature is the caller's input


def test_the_head_draws_the_start_soc_from_the_data(params):
    """Each window's starting SOC comes from its class's real start-SOC quantiles (soc_start of real windows), not
    from the generator: a uniform u gives the u-quantile of its class; the voltage's window level follows it."""
    data = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")[::10]
    classes = np.repeat([0, 1], [len(data) // 2, len(data) - len(data) // 2])
    tables = cell_model.soc_start(np.asarray(data), classes, 2)
    np.testing.assert_allclose(tables[1], np.quantile(data[classes == 1, 0, 3], np.linspace(0, 1, 101)))
    head = PhysicsHead(with_soc_start(params, tables), SCALER)
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    onehot = torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0]])
    drawn = head.start_soc(u, onehot).numpy()
    expect = [tables[0][0], tables[1][25], tables[1][50], tables[0][-1]]
    np.testing.assert_allclose(drawn, expect, atol=1e-6)
    # the same raw outputs from two start SOCs: the fuller window sits higher in voltage, by the cell's OCV
    b, t = 2, 60
    raw = torch.zeros(b, t, cell_model.RAW_CHANNELS)
    uniform_head = PhysicsHead(with_soc_start(params), SCALER)
    held = torch.special.ndtri(torch.tensor([0.2, 0.9]))
    out = uniform_head(raw, torch.zeros(b, t, 4), torch.full((b, t), 0.9), held, torch.zeros(b, 0))
    volts = out[..., 0].numpy() * (SCALER["max"][0] - SCALER["min"][0]) + SCALER["min"][0]
    assert volts[1].mean() - volts[0].mean() > 0.2   # 20 % against 90 % SOC: several hundred mV apart


def test_physics_run_trains_resumes_and_generates(tiny_data, soc_model, tmp_path, capsys):
    """--generator-head physics end to end on the tiny GAN: its config records the cell model, -r keeps the head,
    generate.py rebuilds it from config.json alone, and a config without the model is refused in one line."""
    import generate
    from helpers import make_tiny_run, tiny_args
    from run_dir import RunDir
    from train_lstm_gan import main
    run = make_tiny_run(tiny_data, soc_model, tmp_path / "results", "--generator-head", "physics",
                        "--generator-noise", "smooth", "-e", "2", "-s", "1")
    config = json.loads((run / "config.json").read_text())
    recorded = dict(config["cell_model"])
    start = recorded.pop("soc_start")
    assert recorded == cell_model.load(SHIPPED) and config["args"]["generator_head"] == "physics"
    real = np.load(tiny_data)
    np.testing.assert_allclose(start[0], np.quantile(real[:, 0, 3], np.linspace(0, 1, 101)), rtol=1e-6)
    base = ["-r", run.name, "--results-dir", str(run.parent)]
    assert main([*base, "-e", "3"]) == 0 and len(RunDir(run).read_losses()) == 4
    assert main([*base, "-e", "4", "--generator-head", "none"]) == 2
    assert "generator_head=none (run: physics)" in capsys.readouterr().err
    assert main(tiny_args(tiny_data, soc_model, tmp_path / "other", "--generator-head", "physics", "-e", "1")) == 2
    assert "--generator-noise mixed or smooth" in capsys.readouterr().err and not (tmp_path / "other").exists()
    out = tmp_path / "x.npy"
    assert generate.main([*base, "-n", "3", "-o", str(out), "--seed", "0"]) == 0
    current = np.load(out)[..., 1]   # physical units (A), as generate.py writes them
    lsb = config["cell_model"]["sensor_lsb"][1]
    assert np.abs(current / lsb - np.round(current / lsb)).max() < 0.05   # the current on its sensor's grain
    del config["cell_model"]
    (run / "config.json").write_text(json.dumps(config))
    out.unlink()
    assert generate.main([*base, "-n", "3", "-o", str(out)]) == 2
    assert "without its cell_model" in capsys.readouterr().err and not out.exists()
