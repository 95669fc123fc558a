"""generate.py: a tiny trained run -> synthetic data in physical units, SOC from the estimator, readable files;
bad input is one line, exit 2, nothing written."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import generate
import sampling
from helpers import mtimes

ROOT = Path(__file__).resolve().parent.parent
SCALER = json.loads((ROOT / "data" / "lg_600_data.json").read_text())["scaler"]


def gen(run: Path, *extra) -> int:
    return generate.main(["-r", run.name, "--results-dir", str(run.parent), "--device", "cpu", *extra])


def test_csv_in_physical_units_with_soc_from_the_estimator(tiny_run, soc_model, tmp_path):
    out = tmp_path / "synthetic.csv"
    assert gen(tiny_run, "-n", "5", "-o", str(out), "--seed", "3") == 0
    df = pd.read_csv(out)
    assert list(df.columns) == ["sequence", "step", "time_s", "voltage_V", "current_A", "temperature_C", "soc"]
    assert len(df) == 5 * 20   # L = min(socs, T - socs) = 20 steps per sequence
    assert df["sequence"].nunique() == 5 and df["step"].max() == 19
    np.testing.assert_allclose(df["time_s"], df["step"] / 10)
    # a 2-epoch generator is far from the data, but the columns must be unscaled with the run's scaler
    x = reference(tiny_run, n=5, seed=3).x
    np.testing.assert_allclose(df["voltage_V"].to_numpy().reshape(5, 20),
                               x[..., 0] * (SCALER["max"][0] - SCALER["min"][0]) + SCALER["min"][0], rtol=1e-5)
    np.testing.assert_allclose(df["soc"].to_numpy().reshape(5, 20), x[..., 3], rtol=1e-5, atol=1e-6)
    # the SOC column is the estimator's label of the window ending at each kept step (steps 19..38 of 40)
    from soc_estimator import SOCEstimator
    config = json.loads((tiny_run / "config.json").read_text())
    generator = sampling.load_generator(config, tiny_run / "2_epoch", torch.device("cpu"))
    seqs = sampling.generate(generator, 5, 3, 256, torch.device("cpu"))
    soc = SOCEstimator.load(soc_model).label(seqs, window=20)   # column k: window ending at step 19 + k
    np.testing.assert_allclose(df["soc"].to_numpy().reshape(5, 20), soc[:, :20], rtol=1e-5, atol=1e-6)
    meta = json.loads(out.with_name("synthetic.csv.json").read_text())
    assert meta["epoch"] == 2 and meta["seed"] == 3 and meta["first_generated_step"] == 19 and meta["hz"] == 10


def reference(run: Path, n: int, seed: int, epoch: int = 2, steps: str = "paper", device: str = "cpu",
              labels: str = "estimator") -> sampling.Labelled:
    config = json.loads((run / "config.json").read_text())
    return sampling.synthesize(run, config, run / f"{epoch}_epoch", n, seed, torch.device(device), steps=steps,
                               labels=labels)


def test_real_data_round_trip_stays_in_physical_ranges():
    """The unscaling the files use maps the real training windows into the cell's physical ranges."""
    real = np.load(ROOT / "data" / "lg_600_data.npy", mmap_mode="r")[::50]
    phys = sampling.to_physical(np.asarray(real), SCALER)
    assert 2.5 <= phys[..., 0].min() and phys[..., 0].max() <= 4.25        # volts
    assert -20 <= phys[..., 1].min() and phys[..., 1].max() <= 7          # amperes, discharge negative
    assert -2 <= phys[..., 2].min() and phys[..., 2].max() <= 27          # degC
    assert 0 <= phys[..., 3].min() and phys[..., 3].max() <= 1            # SOC untouched


def test_parquet_npy_and_scaled_outputs_agree(tiny_run, tmp_path):
    pq, npy, scaled = tmp_path / "a.parquet", tmp_path / "a.npy", tmp_path / "s.parquet"
    for out, extra in ((pq, []), (npy, []), (scaled, ["--scaled"])):
        assert gen(tiny_run, "-n", "4", "-o", str(out), "--seed", "9", "--epoch", "1", *extra) == 0
    df, arr, sdf = pd.read_parquet(pq), np.load(npy), pd.read_parquet(scaled)
    assert arr.shape == (4, 20, 4) and arr.dtype == np.float32
    np.testing.assert_allclose(df[["voltage_V", "current_A", "temperature_C", "soc"]].to_numpy(),
                               arr.reshape(-1, 4), rtol=1e-6)
    assert list(sdf.columns[3:]) == ["voltage_scaled", "current_scaled", "temperature_scaled", "soc"]
    lo, hi = np.array(SCALER["min"]), np.array(SCALER["max"])
    np.testing.assert_allclose(sdf.iloc[:, 3:6].to_numpy() * (hi - lo) + lo, df.iloc[:, 3:6].to_numpy(),
                               rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a.parquet", "a.parquet.json", "a.npy", "a.npy.json", "s.parquet", "s.parquet.json"])   # no temp files


def test_seed_reproduces_and_labelled_steps_cover_every_labelled_step(tiny_run, device):
    a, first, spread = reference(tiny_run, n=3, seed=4, device=device)
    b = reference(tiny_run, n=3, seed=4, device=device).x
    c = reference(tiny_run, n=3, seed=5, device=device).x
    assert spread is None   # the estimator's labels have no spread
    assert first == 19 and np.array_equal(a, b) and not np.allclose(a, c)
    # the noise is drawn on the CPU: a seed gives the same sequences on every device, up to kernel rounding
    np.testing.assert_allclose(a, reference(tiny_run, n=3, seed=4)[0], rtol=1e-4, atol=1e-5)
    full, first_full, _ = reference(tiny_run, n=3, seed=4, steps="labelled", device=device)
    assert first_full == 19 and full.shape == (3, 21, 4)   # steps 19..39 (the paper's mode drops the last)
    np.testing.assert_allclose(full[:, :20], a, rtol=1e-6)
    # generating in batches gives the same sequences as one batch
    config = json.loads((tiny_run / "config.json").read_text())
    g = sampling.load_generator(config, tiny_run / "2_epoch", torch.device(device))
    np.testing.assert_allclose(sampling.generate(g, 5, 1, 2, torch.device(device)),
                               sampling.generate(g, 5, 1, 256, torch.device(device)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["no_run", "no_epoch", "extension", "folder", "n_zero", "no_scaler", "argparse",
                                  "all_steps_estimator", "fused_no_capacity"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny_run, tmp_path, capsys):
    out = tmp_path / "out.csv"
    argv = ["-r", tiny_run.name, "--results-dir", str(tiny_run.parent), "-n", "2", "-o", str(out), "--device", "cpu"]
    if case == "no_run":
        argv[1] = "0_no_such_run"
    elif case == "no_epoch":
        argv += ["--epoch", "7"]
    elif case == "extension":
        out = tmp_path / "out.xlsx"
        argv[argv.index("-o") + 1] = str(out)
    elif case == "folder":
        out = tmp_path / "missing" / "out.csv"
        argv[argv.index("-o") + 1] = str(out)
    elif case == "n_zero":
        argv[argv.index("-n") + 1] = "0"
    elif case in ("no_scaler", "fused_no_capacity"):   # a copy of the run whose data had no (capacity in its) sidecar
        copy = tmp_path / "runs" / tiny_run.name
        shutil.copytree(tiny_run, copy)
        config = json.loads((copy / "config.json").read_text())
        config["scaler"] = None if case == "no_scaler" else {k: v for k, v in SCALER.items() if k != "capacity_ah"}
        if case == "fused_no_capacity":   # nor a data sidecar to take the capacity from
            config["data_path"] = str(tmp_path / "runs" / "moved.npy")
        (copy / "config.json").write_text(json.dumps(config))
        argv[argv.index("--results-dir") + 1] = str(copy.parent)
        argv += ["--soc-labels", "fused"] * (case == "fused_no_capacity")
    elif case == "all_steps_estimator":   # the estimator cannot label the steps before its first window ends
        argv += ["--steps", "all"]
    elif case == "argparse":
        argv.remove("-r")
        argv.remove(tiny_run.name)
    before = sorted(tmp_path.rglob("*"))
    if case == "argparse":   # argparse's own errors exit from inside main
        with pytest.raises(SystemExit) as exc:
            generate.main(argv)
        code = exc.value.code
    else:
        code = generate.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err, err
    assert {"fused_no_capacity": "--soc-labels fused", "all_steps_estimator": "--steps all"}.get(case, "") in err
    assert sorted(tmp_path.rglob("*")) == before   # nothing written


def test_command_line_runs_without_tensorflow(tiny_run, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "cli.parquet"
    argv = ["-r", tiny_run.name, "--results-dir", str(tiny_run.parent), "-n", "2", "-o", str(out), "--seed", "1"]
    # importing tensorflow or keras would now fail: the whole path must get by without them
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None; import generate; "
            f"sys.exit(generate.main({argv!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(pd.read_parquet(out)) == 2 * 20


def test_coulomb_check_in_the_sidecar_and_max_coulomb_error_keeps_only_close_sequences(tiny_run, tmp_path, capsys):
    import metrics
    config = json.loads((tiny_run / "config.json").read_text())
    out = tmp_path / "all.npy"
    assert gen(tiny_run, "-n", "12", "-o", str(out), "--seed", "2", "--scaled") == 0
    report = json.loads(out.with_name("all.npy.json").read_text())["soc_coulomb"]
    gaps = metrics.coulomb_gap(np.load(out), config["scaler"])
    assert report["kept"] == report["drawn"] == 12 and report["acceptance_rate"] == 1
    assert report["soc_coulomb_error_pct"] == pytest.approx(gaps.mean())
    tolerance = float(np.median(gaps))   # about half of the tiny generator's sequences pass
    kept = tmp_path / "kept.npy"
    assert gen(tiny_run, "-n", "12", "-o", str(kept), "--seed", "2", "--scaled",
               "--max-coulomb-error", str(tolerance)) == 0
    x = np.load(kept)
    assert len(x) == 12 and (metrics.coulomb_gap(x, config["scaler"]) <= tolerance).all()
    report = json.loads(kept.with_name("kept.npy.json").read_text())["soc_coulomb"]
    assert report["drawn"] > 12 and 0 < report["acceptance_rate"] < 1
    assert "acceptance" in capsys.readouterr().out
    assert gen(tiny_run, "-n", "2", "-o", str(tmp_path / "bad.npy"), "--max-coulomb-error", "0") == 2
    assert not (tmp_path / "bad.npy").exists()


def test_the_shipped_cpu_run_generates_without_training(tmp_path):
    """results/lg_cpu_unconditional on a fresh clone: the README's generate command without --epoch, which takes
    the recommended snapshot (the only one shipped, 150), one sequence, in physical units and inside the cell's
    voltage range; the run folder is left as it was."""
    run = ROOT / "results" / "lg_cpu_unconditional"
    before = mtimes(run)
    out = tmp_path / "synthetic.parquet"
    assert generate.main(["-r", run.name, "--results-dir", str(run.parent), "-n", "1",
                          "-o", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.with_name(out.name + ".json").read_text())["epoch"] == 150
    df = pd.read_parquet(out)
    assert len(df) > 100 and df["sequence"].nunique() == 1
    assert df["voltage_V"].between(2.5, 4.2).all() and df["soc"].notna().all()
    assert mtimes(run) == before


# ----------------------------------------------------------------------------------------------------------------
# --soc-labels: the default is the estimator's (the paper's), bit for bit; fused labels label every step

def test_default_labels_are_the_estimators_bit_for_bit(tiny_run, soc_model, tmp_path):
    """The default path is the code before fused labels existed: the generator's V, I, T and the estimator's label
    of the window ending at each kept step, bit for bit, with or without --soc-labels estimator; no spread."""
    from soc_estimator import SOCEstimator
    default, named = tmp_path / "d.npy", tmp_path / "e.npy"
    assert gen(tiny_run, "-n", "5", "-o", str(default), "--seed", "3", "--scaled") == 0
    assert gen(tiny_run, "-n", "5", "-o", str(named), "--seed", "3", "--scaled", "--soc-labels", "estimator") == 0
    x = np.load(default)
    assert default.read_bytes() == named.read_bytes() and x.shape == (5, 20, 4)
    config = json.loads((tiny_run / "config.json").read_text())
    seqs = sampling.generate(sampling.load_generator(config, tiny_run / "2_epoch", torch.device("cpu")), 5, 3, 256,
                             torch.device("cpu"))
    assert np.array_equal(x[..., :3], seqs[:, 19:39])
    assert np.array_equal(x[..., 3], SOCEstimator.load(soc_model).label(seqs, window=20, batch_size=256)[:, :20])
    meta = json.loads(default.with_name("d.npy.json").read_text())
    assert meta["soc_labels"] == "estimator" and meta["soc_fused"] is None and meta["soc_spread"] is None
    assert meta["steps_kept"] == "paper" and meta["soc_coulomb"]["criterion"] is None
    csv = tmp_path / "d.csv"
    assert gen(tiny_run, "-n", "2", "-o", str(csv), "--seed", "3") == 0
    assert "soc_spread" not in pd.read_csv(csv).columns


def test_fused_labels_label_every_step_by_charge_counting_with_their_spread(tiny_run, soc_model, tmp_path):
    from soc_estimator import SOCEstimator, counted_soc
    import metrics
    npy, pq, paper = tmp_path / "f.npy", tmp_path / "f.parquet", tmp_path / "p.npy"
    assert gen(tiny_run, "-n", "4", "-o", str(npy), "--seed", "3", "--scaled", "--soc-labels", "fused") == 0
    assert gen(tiny_run, "-n", "4", "-o", str(pq), "--seed", "3", "--soc-labels", "fused") == 0
    assert gen(tiny_run, "-n", "4", "-o", str(paper), "--seed", "3", "--scaled", "--soc-labels", "fused",
               "--steps", "paper") == 0
    x = np.load(npy)
    assert x.shape == (4, 40, 4) and np.isfinite(x).all()   # every generated step, each with a label
    # the labels move with the charge the current carries, to float32 precision
    np.testing.assert_allclose(np.diff(x[..., 3], axis=1), np.diff(counted_soc(x, SCALER), axis=1), rtol=0,
                               atol=2.5e-7)
    assert metrics.coulomb_gap(x, SCALER).max() < 1e-4
    # and they are soc_estimator's fused labels of the generated sequences
    config = json.loads((tiny_run / "config.json").read_text())
    seqs = sampling.generate(sampling.load_generator(config, tiny_run / "2_epoch", torch.device("cpu")), 4, 3, 256,
                             torch.device("cpu"))
    soc, spread = SOCEstimator.load(soc_model).fused_labels(seqs, SCALER, window=20, batch_size=256)
    assert np.array_equal(x[..., :3], seqs) and np.array_equal(x[..., 3], soc)
    # the paper's steps of the same sequences carry the same labels
    assert np.array_equal(np.load(paper), x[:, 19:39])
    # the spread: a column of csv / parquet (one value per sequence) and, per sequence, in the sidecar
    df = pd.read_parquet(pq)
    assert list(df.columns) == ["sequence", "step", "time_s", "voltage_V", "current_A", "temperature_C", "soc",
                                "soc_spread"]
    assert len(df) == 4 * 40 and df["step"].max() == 39
    np.testing.assert_allclose(df["soc"].to_numpy().reshape(4, 40), soc, rtol=1e-6)
    per_row = df["soc_spread"].to_numpy().reshape(4, 40)
    assert (per_row == per_row[:, :1]).all() and np.array_equal(per_row[:, 0], spread)
    for out in (npy, pq):
        meta = json.loads(out.with_name(out.name + ".json").read_text())
        assert meta["soc_labels"] == "fused" and meta["steps_kept"] == "all" and meta["first_generated_step"] == 0
        assert meta["soc_fused"]["readings"] == 4 and meta["soc_fused"]["reading_steps"] == [19, 26, 32, 39]
        assert meta["soc_fused"]["reading_window"] == 20 and "median" in meta["soc_fused"]["combination"]
        assert meta["soc_spread"]["per_sequence"] == spread.tolist() and "root mean square" in \
            meta["soc_spread"]["definition"]
        assert meta["soc_coulomb"]["soc_coulomb_error_pct"] < 1e-4
    assert json.loads(pq.with_name("f.parquet.json").read_text())["columns"][-1] == "soc_spread"
    assert json.loads(npy.with_name("f.npy.json").read_text())["columns"][-1] == "soc"


def test_max_coulomb_error_with_fused_labels_gates_on_the_spread(tiny_run, tmp_path, capsys):
    out = tmp_path / "all.npy"
    assert gen(tiny_run, "-n", "12", "-o", str(out), "--seed", "2", "--scaled", "--soc-labels", "fused") == 0
    spread = np.array(json.loads(out.with_name("all.npy.json").read_text())["soc_spread"]["per_sequence"])
    tolerance = float(np.median(spread) * 100)   # about half of the tiny generator's sequences pass
    kept = tmp_path / "kept.npy"
    capsys.readouterr()
    assert gen(tiny_run, "-n", "12", "-o", str(kept), "--seed", "2", "--scaled", "--soc-labels", "fused",
               "--max-coulomb-error", str(tolerance)) == 0
    meta = json.loads(kept.with_name("kept.npy.json").read_text())
    kept_spread = np.array(meta["soc_spread"]["per_sequence"])
    assert len(np.load(kept)) == 12 and len(kept_spread) == 12 and (kept_spread * 100 <= tolerance).all()
    report = meta["soc_coulomb"]
    assert report["drawn"] > 12 and 0 < report["acceptance_rate"] < 1 and "spread" in report["criterion"]
    said = capsys.readouterr().out
    assert "spread" in said and "acceptance" in said
    # the first round's sequences within the tolerance come first, in order
    first_round = np.load(out)[spread * 100 <= tolerance]
    assert np.array_equal(np.load(kept)[:len(first_round)], first_round)
