"""evaluate.py on a tiny CPU run: metrics.json with every metric, the plots, reproducibility, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest

import evaluate
from helpers import mtimes

# the post-hoc models at toy size: the point here is the plumbing, test_metrics.py checks the numbers
TINY = ["--device", "cpu", "--epochs", "2", "--hidden", "8", "--tstr-epochs", "1", "--tstr-hidden", "8",
        "--tstr-max-test", "64", "--n-samples", "50"]
PLOTS = ("pca.png", "tsne.png", "sequences.png", "marginals.png", "acf.png")
EVERY_KEY = ("nonfinite_share", "w1_V", "w1_I", "w1_T", "w1_SOC", "w1_mean", "acf_diff_V", "acf_diff_mean",
             "mmd2_rbf_flat", "mmd2_rbf_diff", "phys_v_out_of_limits", "phys_t_out_of_range", "phys_v_residual_mv",
             "phys_resistance_mohm", "real_phys_resistance_mohm",
             "phys_soc_out_of_range", "phys_soc_rise_while_discharging", "real_phys_v_out_of_limits",
             "discriminative_score", "discriminative_accuracy", "predictive_mae", "predictive_mae_real",
             "tstr_rmse_soc_pct", "tstr_mae_soc_pct", "trtr_rmse_soc_pct", "trtr_mae_soc_pct")


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
    assert "epoch 2: nonfinite_share=0, w1_V=" in capsys.readouterr().out


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
