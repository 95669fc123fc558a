"""evaluate.py on a tiny CPU run: metrics.json with every metric, the plots, reproducibility, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from helpers import ROOT, mtimes

# the post-hoc models at toy size: the point here is the plumbing, test_metrics.py checks the numbers
TINY = ["--device", "cpu", "--epochs", "2", "--hidden", "8", "--tstr-epochs", "1", "--tstr-hidden", "8",
        "--tstr-max-test", "64", "--n-samples", "50", "--realism-hidden", "8", "--realism-epochs", "2"]
PLOTS = ("pca.png", "tsne.png", "sequences.png", "marginals.png", "acf.png")
EVERY_KEY = ("nonfinite_share", "w1_V", "w1_I", "w1_T", "w1_SOC", "w1_mean", "acf_diff_V", "acf_diff_mean",
             "mmd2_rbf_flat", "mmd2_rbf_diff", "phys_v_out_of_limits", "phys_t_out_of_range", "phys_v_residual_mv",
             "phys_resistance_mohm", "real_phys_resistance_mohm",
             "phys_soc_out_of_range", "phys_soc_rise_while_discharging", "real_phys_v_out_of_limits",
             "discriminative_score", "discriminative_accuracy", "discriminative_n", "predictive_mae",
             "predictive_mae_real", "predictive_n", "tstr_rmse_soc_pct", "tstr_mae_soc_pct", "trtr_rmse_soc_pct",
             "trtr_mae_soc_pct", "tstr_n_windows", "tstr_n_test", "realism_n_per_side", "realism_gbt_score",
             "realism_gbt_floor", "realism_gru_score", "realism_gru_floor")


def ev(run: Path, *extra) -> int:
    return evaluate.main(["-r", run.name, "--results-dir", str(run.parent), *TINY, *extra])


def test_latest_epoch_gets_every_metric_and_the_plots(tiny_run, capsys, device):
    assert ev(tiny_run, "--device", device) == 0
    epoch_dir = tiny_run / "2_epoch"   # the latest
    values = json.loads((epoch_dir / "metrics.json").read_text())
    for key in EVERY_KEY:
        assert key in values, key
    assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in values.values())   # flat, numbers only
    settings = json.loads((epoch_dir / "metrics_settings.json").read_text())
    assert settings["seed"] == 0 and settings["constants"]["v_limits_V"] == [2.5, 4.2]
    assert settings["real_steps"] == [19, 38] and "discriminative_score" in settings["docs"]
    for name in PLOTS:
        assert (epoch_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (tiny_run / "1_epoch" / "metrics_settings.json").exists()   # only the epoch asked for
    assert not list(tiny_run.rglob(".*.tmp"))
    out = capsys.readouterr().out
    assert "epoch 2: nonfinite_share=0, w1_V=" in out
    # the realism scores of the 12 snapshot sequences against 12 of the 24 real windows: scored, flagged, and
    # every post-hoc score printed with its sample size and the small-sample warning
    realism_json = json.loads((epoch_dir / "realism.json").read_text())
    assert realism_json["n_per_side"] == values["realism_n_per_side"] == 12 and values["discriminative_n"] == 12
    assert realism_json["small_sample"] and realism_json["watch_only"] and realism_json["soc_labels"] == "estimator"
    assert realism_json["gru"]["score"] == values["realism_gru_score"] and realism_json["gbt"]["top_features"]
    assert settings["realism"]["n_per_side"] == 12 and "realism_gbt_floor" in settings["docs"]
    watch = "fewer than 100: for watching only, not a claim"
    for key, n in (("discriminative_score", "12 per side"), ("predictive_mae", "12 training sequences"),
                   ("tstr_rmse_soc_pct", "12 training windows"), ("realism_gbt_score", "12 per side")):
        assert f"{key}={values[key]:.4g} (n = {n}, {watch})" in out, key
    assert "gradient-boosted trees: score" in out and "n = 12 per side (fewer than 100 per side: for watching" in out


def test_same_seed_same_numbers_and_merge_with_the_trainers_file(tiny_run):
    path = tiny_run / "1_epoch" / "metrics.json"
    path.write_text(json.dumps({"trainer_key": 1.5, "w1_V": -1.0}))
    assert ev(tiny_run, "--epoch", "1", "--seed", "3") == 0
    first = json.loads(path.read_text())
    assert first["trainer_key"] == 1.5 and first["w1_V"] >= 0   # kept, and overwritten with the fresh value
    assert ev(tiny_run, "--epoch", "1", "--seed", "3") == 0
    assert json.loads(path.read_text()) == first
    assert ev(tiny_run, "--epoch", "1", "--seed", "4", "--quick") == 0
    assert json.loads((path.parent / "metrics_settings.json").read_text())["seed"] == 4


def test_all_epochs_quick_and_paper_segment(tiny_run, tmp_path):
    # a copy, so the other tests' files stay as they left them
    import shutil
    copy = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, copy)
    for p in copy.rglob("metrics*.json"):
        p.unlink()
    assert evaluate.main(["-r", copy.name, "--results-dir", str(tmp_path), *TINY, "--epoch", "all", "--quick",
                          "--pca-segment", "paper"]) == 0
    for n in (1, 2):
        values = json.loads((copy / f"{n}_epoch" / "metrics.json").read_text())
        assert "w1_mean" in values and "discriminative_score" not in values   # quick: no post-hoc models
        assert json.loads((copy / f"{n}_epoch" / "metrics_settings.json").read_text())["pca_segment"] == "paper"


def test_generate_fresh_sequences(tiny_run, tmp_path):
    import shutil
    copy = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, copy)
    (copy / "2_epoch" / "fake_data.npy").unlink()   # --generate does not need the saved samples
    assert evaluate.main(["-r", copy.name, "--results-dir", str(tmp_path), *TINY, "--quick", "--generate", "30"]) == 0
    settings = json.loads((copy / "2_epoch" / "metrics_settings.json").read_text())
    assert settings["n_fake"] == 30 and settings["fake"] == "--generate 30"


def test_generate_with_fused_labels_and_the_labels_each_sample_carries(tiny_run, tmp_path):
    """--generate N --soc-labels fused scores fresh sequences with fused labels over the paper's steps (those of
    fake_data.npy, so the metrics compare like with like); metrics_settings.json says which labels were scored."""
    import shutil
    copy = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, copy)
    argv = ["-r", copy.name, "--results-dir", str(tmp_path), *TINY, "--quick"]
    settings_path, metrics_path = copy / "2_epoch" / "metrics_settings.json", copy / "2_epoch" / "metrics.json"
    assert evaluate.main(argv) == 0   # the trainer's fake_data.npy: the estimator's labels, its sidecar says
    assert json.loads(settings_path.read_text())["soc_labels"] == "estimator"
    estimator = json.loads(metrics_path.read_text())
    assert evaluate.main([*argv, "--generate", "12", "--soc-labels", "fused"]) == 0
    settings, values = json.loads(settings_path.read_text()), json.loads(metrics_path.read_text())
    assert settings["soc_labels"] == "fused" and settings["n_fake"] == 12 and settings["steps"] == 20
    assert settings["real_steps"] == [19, 38]
    assert all(isinstance(v, (int, float)) for v in values.values())   # metrics.json stays numbers only
    # fused labels are made of the charge count: no coulomb gap, no SOC rising while the current discharges
    assert values["soc_coulomb_error"] < 1e-4 and values["soc_coulomb_fail_share"] == 0
    assert values["phys_soc_rise_while_discharging"] == 0 < estimator["phys_soc_rise_while_discharging"]
    assert evaluate.main([*argv, "--generate", "12"]) == 0   # --generate alone: the paper's labels
    assert json.loads(settings_path.read_text())["soc_labels"] == "estimator"


def test_repeats_score_fresh_samples_at_the_next_seeds(tiny_run, tmp_path, capsys):
    import shutil
    copy = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, copy)
    argv = ["-r", copy.name, "--results-dir", str(tmp_path), *TINY, "--quick", "--generate", "12"]
    epoch_dir = copy / "2_epoch"
    single = {}
    for seed in (5, 6, 7):   # each seed alone, as the repeats must reproduce
        assert evaluate.main([*argv, "--seed", str(seed)]) == 0
        single[seed] = json.loads((epoch_dir / "metrics.json").read_text())
    assert not (epoch_dir / "metrics_repeats.json").exists()
    capsys.readouterr()
    assert evaluate.main([*argv, "--seed", "5", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    repeats = json.loads((epoch_dir / "metrics_repeats.json").read_text())
    assert repeats["seeds"] == [5, 6, 7] and repeats["n_fake"] == 12
    assert json.loads((epoch_dir / "metrics.json").read_text()) == single[5]   # metrics.json: the first seed's
    for key in ("w1_mean", "mmd2_rbf_flat", "acf_diff_mean"):
        per_seed = [single[s][key] for s in (5, 6, 7)]
        assert repeats["values"][key] == per_seed
        assert repeats["mean"][key] == pytest.approx(np.mean(per_seed))
        assert repeats["sd"][key] == pytest.approx(np.std(per_seed, ddof=1))
    assert len(set(repeats["values"]["mmd2_rbf_flat"])) == 3   # three samples, not one scored thrice
    assert json.loads((epoch_dir / "metrics_settings.json").read_text())["repeats"] == 3
    assert f"mean +- sd over seeds 5..7: nonfinite_share=0+-0, w1_V={repeats['mean']['w1_V']:.4g}+-" in out


@pytest.mark.parametrize("case", ["no_run", "no_epoch", "no_real", "no_test", "bad_epoch", "no_fake",
                                  "repeats_without_generate", "labels_without_generate"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny_run, tmp_path, capsys):
    import shutil
    copy = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, copy)
    argv = ["-r", copy.name, "--results-dir", str(tmp_path), *TINY]
    if case == "no_run":
        argv[1] = "0_no_such_run"
    elif case == "no_epoch":
        argv += ["--epoch", "9"]
    elif case == "no_real":
        argv += ["--real", str(tmp_path / "missing.npy")]
    elif case == "no_test":
        argv += ["--test", str(tmp_path / "missing.npy")]
    elif case == "bad_epoch":
        argv += ["--epoch", "latest"]
    elif case == "no_fake":
        (copy / "1_epoch" / "fake_data.npy").unlink()
        argv += ["--epoch", "all", "--quick"]
    elif case == "repeats_without_generate":   # the saved sample is one sample: repeating it measures nothing
        argv += ["--quick", "--repeats", "2"]
    elif case == "labels_without_generate":   # fake_data.npy carries the trainer's labels: none to choose
        argv += ["--quick", "--soc-labels", "fused"]
    before = mtimes(tmp_path)
    if case == "bad_epoch":
        with pytest.raises(SystemExit) as exc:
            evaluate.main(argv)
        code = exc.value.code
    else:
        code = evaluate.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err, err
    assert mtimes(tmp_path) == before


# ---- --downstream ----------------------------------------------------------------------------------------------

TOY_BUDGET = {"hidden": 8, "lr": 1e-2, "batch_size": 16, "epochs": 2, "patience": 2}
CONFIGURATIONS = ["trtr", "label_source", "tstr", "real_5pct", "real_5pct+synthetic", "real_10pct",
                  "real_10pct+synthetic"]


@pytest.fixture(scope="module")
def downstream_data(tmp_path_factory) -> dict[str, Path]:
    """Real sequences of every training file (4 per file, 40 steps: two of the tiny run's 20-step SOC windows
    each) and 4 windows of every test file (their last 40 steps), each with the sidecar file_index lg_dataset.py
    writes."""
    folder = tmp_path_factory.mktemp("downstream_data")
    paths = {}
    for name, stem in (("real", "lg_600_data"), ("test", "lg_test_300_data")):
        x = np.load(ROOT / "data" / f"{stem}.npy", mmap_mode="r")
        side = json.loads((ROOT / "data" / f"{stem}.json").read_text())
        rows, index = [], []
        for it in side["file_index"]:
            take = list(range(it["start"], it["stop"], max(1, (it["stop"] - it["start"]) // 4)))[:4]
            index.append({**it, "start": len(rows), "stop": len(rows) + len(take)})
            rows += take
        paths[name] = folder / f"{name}.npy"
        np.save(paths[name], np.ascontiguousarray(x[rows, -40:]))
        paths[name].with_suffix(".json").write_text(json.dumps({"scaler": side["scaler"], "file_index": index}))
    return paths


def downstream_argv(run: Path, data: dict[str, Path], *extra: str) -> list[str]:
    return ["-r", run.name, "--results-dir", str(run.parent), "--device", "cpu", "--downstream",
            "--real", str(data["real"]), "--test", str(data["test"]), "--downstream-n", "40",
            "--downstream-budget", "toy", *extra]


@pytest.mark.parametrize("labels", ["estimator", "fused"])
def test_downstream_writes_every_configuration_seed_and_the_plot(labels, tiny_run, downstream_data, tmp_path,
                                                                  monkeypatch, capsys):
    import shutil
    import downstream
    monkeypatch.setitem(downstream.BUDGETS, "toy", TOY_BUDGET)
    copy = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, copy)
    epoch_dir = copy / "2_epoch"
    before = {p.name: p.stat().st_mtime_ns for p in epoch_dir.iterdir()}
    assert evaluate.main(downstream_argv(copy, downstream_data, "--soc-labels", labels)) == 0
    result = json.loads((epoch_dir / "downstream.json").read_text())
    assert (epoch_dir / "downstream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name: p.stat().st_mtime_ns for p in epoch_dir.iterdir() if p.name in before} == before  # no metric
    assert sorted(set(p.name for p in epoch_dir.iterdir()) - set(before)) == ["downstream.json", "downstream.png"]
    configs = result["configurations"]
    assert list(configs) == CONFIGURATIONS and result["seeds"] == [0, 1]
    assert all([r["seed"] for r in c["runs"]] == [0, 1] for c in configs.values())
    for c in configs.values():
        for r in c["runs"]:
            assert set(r["per_temp"]) == {"0degC", "10degC", "25degC"}
            assert all(np.isfinite(v) for e in (r["overall"], *r["per_temp"].values()) for v in e.values())
        assert {"rmse_pct", "mae_pct", "0degC/rmse_pct", "25degC/mae_pct"} <= set(c["mean"]) == set(c["sd"])
    settings, budget = result["settings"], result["budget"]
    assert budget == {**TOY_BUDGET, "name": "toy"} and settings["n_windows"] == 40 and settings["epoch"] == 2
    assert settings["test_windows"] == 44 and settings["window"] == 20 and settings["soc_labels"] == labels
    synthetic = settings["synthetic"]
    # fused labels label every step: a 40-step sequence gives two 20-step windows; the estimator's only the
    # exported steps (19..38), one window each
    assert (synthetic["windows_per_sequence"], synthetic["n_sequences"], synthetic["generated_steps"]) == \
        ((2, 20, [0, 39]) if labels == "fused" else (1, 40, [19, 38]))
    # the label-source reference is labelled by the labeller of the synthetic data
    assert configs["label_source"]["labels"] == settings["labeller"] == synthetic["labeller"]
    assert ("fused" in settings["labeller"]) == (labels == "fused")
    assert result["ratios"]["tstr_over_trtr"] == pytest.approx(configs["tstr"]["mean"]["rmse_pct"] /
                                                               configs["trtr"]["mean"]["rmse_pct"])
    out = capsys.readouterr().out
    assert "real_10pct+synthetic_over_real_10pct" in out and f"{labels} labels" in out


def test_downstream_labels_are_those_the_samplers_give(tiny_run, soc_model):
    """The windows --downstream trains on carry the labels generate.py would give the same sequences: with fused
    labels those of sampling.synthesize(steps='all') at each window's end, with the estimator's the label of the
    last exported step (steps='paper'); the label-source labeller is the same function, applied to real data."""
    import downstream
    from sampling import load_soc, run_scaler, synthesize
    from run_dir import RunDir
    config = RunDir.open(tiny_run.parent, tiny_run.name).read_config()
    epoch_dir, device = tiny_run / "2_epoch", torch.device("cpu")
    soc = load_soc(config, tiny_run, device)
    for labels, steps in (("fused", "all"), ("estimator", "paper")):
        labeller = downstream.labeller_for(labels, soc, run_scaler(config), 20)
        (x, y), record = downstream.synthetic_windows(tiny_run, config, epoch_dir, 6, 3, device, labels, labeller)
        sample = synthesize(tiny_run, config, epoch_dir, record["n_sequences"], 3, device, steps=steps,
                            labels=labels).x
        if labels == "fused":
            assert np.array_equal(x, sample[..., :3].reshape(6, 20, 3))
            assert np.allclose(y, sample[:, [19, 39], 3].reshape(-1), atol=1e-6)
        else:
            assert np.array_equal(x, sample[..., :3]) and np.allclose(y, sample[:, -1, 3], atol=1e-6)


@pytest.mark.parametrize("case", ["n_too_large", "unknown_budget", "unwritable", "output_is_a_folder",
                                  "all_epochs", "with_quick", "one_seed", "test_without_index"])
def test_downstream_bad_input_is_one_line_and_writes_nothing(case, tiny_run, downstream_data, tmp_path,
                                                            monkeypatch, capsys):
    import os
    import shutil
    import subprocess
    import downstream
    monkeypatch.setitem(downstream.BUDGETS, "toy", TOY_BUDGET)
    copy = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, copy)
    argv = downstream_argv(copy, downstream_data)
    epoch_dir, locked = copy / "2_epoch", False
    if case == "n_too_large":   # the real pool holds 120 windows
        argv[argv.index("--downstream-n") + 1] = "500"
    elif case == "unknown_budget":
        argv[argv.index("--downstream-budget") + 1] = "huge"
    elif case == "unwritable":
        epoch_dir.chmod(0o555)
        if os.access(epoch_dir, os.W_OK):   # root writes anyway: make the folder immutable instead
            locked = subprocess.run(["chattr", "+i", str(epoch_dir)], capture_output=True).returncode == 0
            if not locked:
                pytest.skip("cannot make a folder unwritable here (root without chattr)")
    elif case == "output_is_a_folder":
        (epoch_dir / "downstream.png").mkdir()
    elif case == "all_epochs":
        argv += ["--epoch", "all"]
    elif case == "with_quick":
        argv += ["--quick"]
    elif case == "one_seed":
        argv += ["--downstream-seeds", "0"]
    elif case == "test_without_index":
        bare = tmp_path / "bare_test.npy"
        shutil.copyfile(downstream_data["test"], bare)
        argv[argv.index("--test") + 1] = str(bare)
    before = mtimes(tmp_path)
    try:
        if case in ("unknown_budget", "one_seed"):   # refused by the parser
            with pytest.raises(SystemExit) as exc:
                evaluate.main(argv)
            code = exc.value.code
        else:
            code = evaluate.main(argv)
    finally:
        if locked:
            subprocess.run(["chattr", "-i", str(epoch_dir)], check=True)
        epoch_dir.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err, err
    assert mtimes(tmp_path) == before
    assert not (epoch_dir / "downstream.json").exists()
