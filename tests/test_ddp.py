"""Multi-process training under torchrun (gloo on CPU): ranks stay in sync, rank 0 writes, resume works."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import read_losses, run_dirs, tiny_args

ROOT = Path(__file__).resolve().parent.parent


def torchrun(tmp_path, args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "tests" / "ddp_driver.py"), str(tmp_path), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_gloo_processes_train_in_sync_and_resume(tiny_data, soc_model, tmp_path):
    results = tmp_path / "results"
    proc = torchrun(tmp_path, tiny_args(tiny_data, soc_model, results, "-e", "4", "-s", "2"), 29611)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [run] = run_dirs(results)   # one folder: only rank 0 writes
    assert [r[0] for r in read_losses(run)[1:]] == ["1", "2", "3", "4"]
    assert (run / "2_epoch" / "fake_data.npy").is_file()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for net in ("G", "D"):
        for key, value in ranks[0][net].items():
            if "running" in key or "num_batches" in key:
                continue   # BatchNorm statistics are per rank (batch statistics are used in training)
            assert torch.equal(value, ranks[1][net][key]), (net, key)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert len(ckpt["rng"]) == 2 and ckpt["epoch"] == 4

    proc = torchrun(tmp_path, ["-r", run.name, "--results-dir", str(results), "-e", "6"], 29612)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r[0] for r in read_losses(run)[1:]] == ["1", "2", "3", "4", "5", "6"]
    # ... exactly as a run that was never interrupted
    straight = tmp_path / "straight"
    proc = torchrun(tmp_path, tiny_args(tiny_data, soc_model, straight, "-e", "6", "-s", "2"), 29613)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_losses(run_dirs(straight)[0]) == read_losses(run)
