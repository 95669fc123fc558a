"""Shared fixtures and helpers: a tiny slice of the shipped real LG windows, a random-weight SOC model file, the
tiny GAN's flags and tiny trained runs. Test modules import helpers from here, never from each other."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# Tiny shapes run fastest on one thread, and the CI machine's two cores are shared with subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCALER = json.loads((ROOT / "data" / "lg_600_data.json").read_text())["scaler"]
torch.set_num_threads(1)

# The tests that take a `device` run on the CPU, and on CUDA too where a GPU is present (tests/gpu_check.sh runs
# those with -k cuda on a GPU machine); CI has none, so there they run once.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever an earlier in-process run (e.g. a CLI's --threads) set."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """24 real windows of 40 steps (V, I, T, SOC) cut from data/lg_600_data.npy: real numbers, tiny shapes."""
    windows = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")
    path = tmp_path_factory.mktemp("data") / "tiny.npy"
    np.save(path, np.ascontiguousarray(windows[::80][:24, :40]))
    return path


@pytest.fixture(scope="session")
def soc_model(tmp_path_factory) -> Path:
    """The paper's SOC network with random weights, saved as a Keras .h5 by the project's writer."""
    from soc_estimator import SOCLSTM, save_keras_h5
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("soc") / "random_soc.h5"
    save_keras_h5(SOCLSTM(), path)
    return path


# ---- the tiny GAN ---------------------------------------------------------------------------------------------

def tiny_args(data: Path, soc_model: Path, results: Path, *extra: str) -> list[str]:
    """train_lstm_gan.py flags of a GAN that trains an epoch in well under a second on one CPU thread."""
    return ["-d", str(data), "-socmp", str(soc_model.parent), "-socm", soc_model.name, "--results-dir", str(results),
            "--model-scale", "0.0625", "-gid", "8", "-b", "8", "-dts", "2", "-socs", "20", "-ess", "12",
            "--device", "cpu", "--seed", "7", *extra]


def run_dirs(results: Path) -> list[Path]:
    return sorted(p for p in results.iterdir() if p.is_dir()) if results.exists() else []


def mtimes(folder: Path) -> dict[Path, int]:
    """Every path below folder with its modification time: equal before and after = nothing written there."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def read_losses(run: Path) -> list[list[str]]:
    with open(run / "losses.csv", newline="") as f:
        return list(csv.reader(f))


def epochs_recorded(results: Path) -> int:
    """Epochs in the first run's losses.csv; 0 while the run folder or its file does not exist yet (the trainer
    makes the folder before it writes the file)."""
    runs = run_dirs(results)
    if not runs or not (runs[0] / "losses.csv").exists():
        return 0
    return len(read_losses(runs[0])) - 1


def stop_training(data: Path, soc_model: Path, results: Path, signum: signal.Signals) -> tuple[int, str]:
    """Start a long tiny run, send signum once a few epochs are recorded -> (exit code, stdout)."""
    cmd = [sys.executable, str(ROOT / "train_lstm_gan.py"), *tiny_args(data, soc_model, results, "-e", "500")]
    proc = subprocess.Popen(cmd, cwd=results.parent, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and epochs_recorded(results) <= 1:
        time.sleep(0.05)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def make_tiny_run(data: Path, soc_model: Path, results: Path, *extra: str) -> Path:
    """Train the tiny GAN (default: 2 epochs, saved at 1 and 2) on data that carries the real scaler in its
    sidecar; -> the run folder."""
    from train_lstm_gan import main
    data_dir = results.parent / "tiny_scaled_data"
    data_dir.mkdir(exist_ok=True)
    npy = data_dir / "tiny.npy"
    shutil.copyfile(data, npy)
    npy.with_suffix(".json").write_text(json.dumps({"scaler": SCALER}))
    assert main(tiny_args(npy, soc_model, results, *(extra or ("-e", "2", "-s", "1")))) == 0
    (run,) = run_dirs(results)
    return run


@pytest.fixture(scope="module")
def tiny_run(tiny_data, soc_model, tmp_path_factory) -> Path:
    """A tiny trained run of this test module's own (a module may write into it)."""
    return make_tiny_run(tiny_data, soc_model, tmp_path_factory.mktemp("run") / "results")


@pytest.fixture
def mini_lists(monkeypatch):
    """The paper's lists cut to the files of the real miniature raw folder tests/fixtures/mini (one train + one
    test file per temperature)."""
    import lg_dataset
    monkeypatch.setattr(lg_dataset, "PAPER_TRAIN_FILES",
                        {"0degC": ["589_Mixed1"], "10degC": ["567_Mixed1"], "25degC": ["551_Mixed1"]})
    monkeypatch.setattr(lg_dataset, "PAPER_TEST_FILES",
                        {"0degC": ["589_UDDS"], "10degC": ["576_UDDS", "582_LA92"], "25degC": ["551_UDDS"]})
