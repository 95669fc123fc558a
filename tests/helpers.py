"""What the tests share besides fixtures: the project's folder, the shipped data's scaler, the tiny GAN's flags and
tiny trained runs. Test modules import these from here (conftest.py holds the fixtures only)."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCALER = json.loads((ROOT / "data" / "lg_600_data.json").read_text())["scaler"]

# The tests that take a `device` run on the CPU, and on CUDA too where a GPU is present (tests/gpu_check.sh runs
# those with -k cuda on a GPU machine); CI has none, so there they run once.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
