"""Result notebook (visualize_lstm_gan.ipynb) and its headless runner (run_notebook.py).

Kernel executions are slow (a few seconds each), so only three tests start one; the edge cases run the notebook's
code cells in this process instead.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")  # for the in-process runs below
ROOT = Path(__file__).resolve().parents[1]
from helpers import make_tiny_run  # noqa: E402
from run_notebook import NotebookError, execute_notebook, main  # noqa: E402

NOTEBOOK = ROOT / "visualize_lstm_gan.ipynb"
SCALER = {"min": [2.5, -20.0, 0.0], "max": [4.2, 6.0, 50.0]}
SECTIONS = ["losses", "sequences", "embeddings", "metrics"]


@pytest.fixture(scope="module")
def real_run(tiny_data, soc_model, tmp_path_factory) -> Path:
    """A real tiny training run (4 epochs, saved at 2 and 4), as the trainer writes it."""
    return make_tiny_run(tiny_data, soc_model, tmp_path_factory.mktemp("nb") / "results", "-e", "4", "-s", "2")


def make_run(root: Path, source: Path, epochs=(2, 4), scaler=SCALER, losses_rows=4, metrics_epoch=4) -> Path:
    """A copy of the real run, changed the way a test needs: epoch folders renamed or dropped, the scaler
    replaced, losses.csv cut to its first rows, metrics.json in one epoch folder only (with known keys)."""
    run = root / source.name
    shutil.copytree(source, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "scaler": scaler}))
    lines = (run / "losses.csv").read_text().splitlines()
    (run / "losses.csv").write_text("\n".join(lines[:1 + losses_rows]) + "\n")
    saved = sorted(run.glob("*_epoch"), key=lambda p: int(p.name.split("_")[0]))
    for folder in saved[len(epochs):]:
        shutil.rmtree(folder)
    for folder, e in zip(saved, epochs):
        (folder / "metrics.json").unlink()
        folder.rename(run / f"{e}_epoch.tmp")
    for e in epochs:
        (run / f"{e}_epoch.tmp").rename(run / f"{e}_epoch")
    if metrics_epoch in epochs:
        (run / f"{metrics_epoch}_epoch" / "metrics.json").write_text(
            json.dumps({"mae_v": 0.01 * metrics_epoch, "rmse_soc": 0.02, "ok": True, "note": "x"}))
    shutil.copy(NOTEBOOK, run / "result.ipynb")
    return run


def cells_by_tag(nb) -> dict:
    return {tag: cell for cell in nb.cells for tag in cell.metadata.get("tags", [])}


def n_png(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def run_in_process(run: Path, monkeypatch) -> dict:
    """Execute the notebook's code cells here (no kernel), cwd = run; returns the namespace."""
    monkeypatch.chdir(run)
    ns = {}
    for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, "<notebook>", "exec"), ns)
    return ns


def test_notebook_is_clean_and_small():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert set(SECTIONS) <= set(cells_by_tag(nb))
    assert "torch" not in "".join(c.source for c in code)
    assert NOTEBOOK.stat().st_size < 30_000


def test_full_run_executes_with_figures(tmp_path, real_run):
    run = make_run(tmp_path, real_run)
    html = execute_notebook(run)
    assert html == run / "result.html" and html.stat().st_size > 0
    assert "data:image/png;base64" in html.read_text()
    nb = nbformat.read(run / "result.ipynb", as_version=4)
    outputs = [out for c in nb.cells if c.cell_type == "code" for out in c.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    tagged = cells_by_tag(nb)
    assert n_png(tagged["losses"]) == 1
    assert n_png(tagged["sequences"]) == 2  # one figure per epoch folder
    assert n_png(tagged["embeddings"]) == 2
    assert n_png(tagged["metrics"]) == 1
    text = "".join(out.get("text", "") for out in outputs)
    assert run.name in text and "epoch folders: [2, 4]" in text
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temp file


def test_run_without_epoch_folders_executes(tmp_path, real_run):
    run = make_run(tmp_path, real_run, epochs=(), scaler=None, losses_rows=1)
    execute_notebook(run)
    nb = nbformat.read(run / "result.ipynb", as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    tagged = cells_by_tag(nb)
    assert n_png(tagged["losses"]) == 1  # a single epoch still draws
    assert n_png(tagged["sequences"]) == n_png(tagged["metrics"]) == 0
    assert "no <N>_epoch/ folder yet" in "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def test_failing_cell_raises_notebook_error(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("raise ValueError('boom\\n42')")])
    nbformat.write(nb, tmp_path / "result.ipynb")
    with pytest.raises(NotebookError, match=r"result\.ipynb: cell 1 failed: ValueError: boom 42") as info:
        execute_notebook(tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "result.html").exists()
    saved = nbformat.read(tmp_path / "result.ipynb", as_version=4)  # kept, with the error shown
    assert saved.cells[1].outputs[0].output_type == "error"


@pytest.mark.parametrize("losses", ["", "epoch,g_loss,d_loss,d_real,d_fake,gp,seconds\n", None])
def test_edge_cases_in_process(tmp_path, monkeypatch, capsys, losses, real_run):
    run = make_run(tmp_path, real_run, epochs=(10, 2), scaler=None, metrics_epoch=None)
    if losses is None:
        (run / "losses.csv").unlink()
    else:
        (run / "losses.csv").write_text(losses)
    (run / "2_epoch" / "tsne_fake.npy").unlink()
    (run / "10_epoch" / "fake_data.npy").unlink()
    ns = run_in_process(run, monkeypatch)
    out = capsys.readouterr().out
    assert "no losses recorded yet" in out
    assert "10_epoch: real_data.npy or fake_data.npy missing" in out
    assert [ns["epoch_of"](p) for p in ns["epoch_dirs"]] == [2, 10]  # numeric, not string order
    assert ns["names"] == []  # no metrics.json anywhere: skipped silently
    assert ns["channel_label"](0) == "Voltage (scaled 0..1)"


def test_physical_units(tmp_path, monkeypatch, real_run):
    ns = run_in_process(make_run(tmp_path, real_run), monkeypatch)
    x = np.array([[[0.0, 0.0, 0.0, 0.3], [1.0, 1.0, 1.0, 0.7]]])
    phys = ns["to_physical"](x)
    np.testing.assert_allclose(phys[0, 0], [2.5, -20.0, 0.0, 0.3])
    np.testing.assert_allclose(phys[0, 1], [4.2, 6.0, 50.0, 0.7])
    assert ns["channel_label"](0) == "Voltage [V]" and ns["channel_label"](3) == "SOC [0..1]"
    assert set(ns["metrics"].columns) == {"epoch", "mae_v", "rmse_soc"}  # bools and strings dropped


def test_the_soc_labels_each_sample_carries(tmp_path, monkeypatch, capsys, real_run):
    """The run's labels from config.json, each snapshot's from its fake_data.npy.json (none: a snapshot from before
    fused labels, the estimator's), each scored sample's from evaluate.py's metrics_settings.json."""
    run = make_run(tmp_path, real_run)
    assert json.loads((run / "2_epoch" / "fake_data.npy.json").read_text())["soc_labels"] == "estimator"
    (run / "2_epoch" / "fake_data.npy.json").unlink()
    (run / "4_epoch" / "fake_data.npy.json").write_text(json.dumps({"soc_labels": "fused"}))
    (run / "4_epoch" / "metrics_settings.json").write_text(json.dumps({"soc_labels": "estimator"}))   # --generate
    ns = run_in_process(run, monkeypatch)
    out = capsys.readouterr().out
    assert "SOC labels of the snapshots (config.json soc_labels): estimator" in out
    assert ns["soc_labels"](Path("4_epoch")) == "fused" and ns["soc_labels"](Path("2_epoch")) == "estimator"
    assert ns["sample_labels"] == {4: "estimator"} and "SOC labels of the scored samples, by epoch: {4: " in out


def test_cli_missing_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run_notebook.py"), str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "nope" in proc.stderr


def test_cli_missing_notebook(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no notebook result.ipynb") and err.count("\n") == 1
