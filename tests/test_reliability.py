"""Issues 16 and 42, as a hostile user would try it, on tiny shapes: safe loading (no payload runs), one writer per
run, the shipped SOC model never overwritten, late crashes caught at start, every bad input one line + exit 2 with
nothing written, atomic writes (what a SIGKILL leaves removed by the next writer), resume only on the run's own data,
signals -> 130 / 143 after the checkpoint, damaged run files one line naming them."""
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import evaluate
import generate
import lg_dataset
import run_dir
import soc_estimator
import train_soc_estimator as ts
from common import atomic_write, sha256
from helpers import read_losses, run_dirs, stop_training, tiny_args
from soc_estimator import SOCLSTM, save_keras_h5
from train_lstm_gan import main

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "tests" / "fixtures" / "mini"


class Payload:
    """Unpickling this runs `touch <marker>`: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line_exit_2(code: int, capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def run(tiny_data, soc_model, tmp_path) -> Path:
    """A finished 2-epoch run (checkpoint at epoch 2)."""
    assert main(tiny_args(tiny_data, soc_model, tmp_path / "results", "-e", "2")) == 0
    return run_dirs(tmp_path / "results")[0]


def resume(run: Path, *extra: str) -> int:
    return main(["-r", run.name, "--results-dir", str(run.parent), *extra])


# ---- 1. safe loading ---------------------------------------------------------------------------------------------

def test_a_checkpoint_with_a_payload_is_refused_and_never_runs(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "extra": Payload(marker)}, run / "checkpoint.pt")
    before = files(run)
    err = one_line_exit_2(resume(run, "-e", "3"), capsys)
    assert "checkpoint.pt" in err and "start a new run" in err
    assert not marker.exists() and files(run) == before


def test_the_soc_trainers_checkpoint_with_a_payload_is_refused(tmp_path, mini_lists, capsys):
    marker, ckpt = tmp_path / "pwned", tmp_path / "m.ckpt.pt"
    torch.save({"model": {}, "opt": {}, "epoch": 1, "history": [], "x": Payload(marker)}, ckpt)
    code = ts.main(["--raw-dir", str(MINI), "--out", str(tmp_path / "m.h5"), "--window", "40", "--stride", "40",
                    "--test-stride", "40", "--epochs", "2", "--device", "cpu", "--resume"])
    assert "m.ckpt.pt" in one_line_exit_2(code, capsys)
    assert not marker.exists() and not (tmp_path / "m.h5").exists()


def test_checkpoints_hold_only_safe_types(run):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)   # raises on anything but safe types
    assert ckpt["format"] == run_dir.CHECKPOINT_FORMAT and "history" not in ckpt
    for name in ("best_generator.pth", "best_discriminator.pth"):
        torch.load(run / name, weights_only=True)


def test_a_checkpoint_of_the_previous_format_still_resumes_exactly(tiny_data, soc_model, tmp_path):
    """Format 1 (before safe loading): numpy's RNG state as an array, the loss history inside, no format key. It
    loads with weights_only=True plus numpy's array reconstruction, and the resumed run equals a straight one."""
    straight = tmp_path / "straight"
    assert main(tiny_args(tiny_data, soc_model, straight, "-e", "4")) == 0
    old = tmp_path / "old"
    assert main(tiny_args(tiny_data, soc_model, old, "-e", "2")) == 0
    [run] = run_dirs(old)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    name, keys, pos, has_gauss, cached = ckpt["rng"][0]["numpy"]
    ckpt["rng"][0]["numpy"] = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    ckpt["history"] = {"g_loss": [0.0, 0.0]}
    del ckpt["format"]
    torch.save(ckpt, run / "checkpoint.pt")
    assert resume(run, "-e", "4") == 0
    assert read_losses(run) == read_losses(run_dirs(straight)[0])


# ---- 2. one writer per run ---------------------------------------------------------------------------------------

def test_a_second_writer_on_a_run_is_refused(run, capsys):
    before = files(run)
    fd = os.open(run, os.O_RDONLY)   # what a training process holds for its whole run
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "another process" in one_line_exit_2(resume(run, "-e", "3"), capsys)
    finally:
        os.close(fd)
    assert files(run) == before
    assert resume(run, "-e", "3") == 0   # the lock goes with its process


# ---- 3. the SOC trainer never overwrites the shipped model -------------------------------------------------------

def test_soc_trainer_defaults_to_a_new_file_and_refuses_to_replace_one(tmp_path, mini_lists, capsys):
    default = ts.output_path(ts.parse_args(["--raw-dir", str(MINI)]))
    assert default.parts[0] == "results" and "soc_models" not in default.parts
    out = tmp_path / "m.h5"
    out.write_bytes(b"precious")
    code = ts.main(["--raw-dir", str(MINI), "--out", str(out), "--window", "40", "--device", "cpu"])
    assert "--overwrite" in one_line_exit_2(code, capsys)
    assert out.read_bytes() == b"precious" and sorted(tmp_path.iterdir()) == [out]


def test_soc_trainer_keeps_another_runs_checkpoint(tmp_path, mini_lists, capsys):
    ckpt = tmp_path / "m.ckpt.pt"
    ckpt.write_bytes(b"another run")
    code = ts.main(["--raw-dir", str(MINI), "--out", str(tmp_path / "m.h5"), "--window", "40", "--stride", "40",
                    "--test-stride", "40", "--epochs", "1", "--device", "cpu"])
    assert "--resume" in one_line_exit_2(code, capsys)
    assert ckpt.read_bytes() == b"another run" and sorted(tmp_path.iterdir()) == [ckpt]


def test_soc_trainer_validates_the_test_files_before_writing(tmp_path, mini_lists, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(MINI, raw)
    for p in raw.rglob("*"):
        if p.is_file() and "Mixed" not in p.name:
            p.unlink()   # training files only
    out = tmp_path / "out" / "m.h5"
    out.parent.mkdir()
    code = ts.main(["--raw-dir", str(raw), "--out", str(out), "--window", "40", "--stride", "40", "--test-stride",
                    "40", "--epochs", "1", "--device", "cpu"])
    one_line_exit_2(code, capsys)
    assert list(out.parent.iterdir()) == []


# ---- 4. late crashes caught at start, a diverged generator recorded ----------------------------------------------

@pytest.mark.parametrize("case", ["ess_1", "socs_T-1", "soc_4_inputs", "scaler_2_values", "gp_nan"])
def test_what_would_crash_at_the_first_snapshot_is_refused_at_start(case, tiny_data, soc_model, tmp_path, capsys):
    data, model, extra = tiny_data, soc_model, []
    if case == "ess_1":
        extra = ["-ess", "1"]
    elif case == "socs_T-1":
        extra = ["-socs", "39"]
    elif case == "soc_4_inputs":
        model = tmp_path / "soc4.h5"
        save_keras_h5(SOCLSTM(n_features=4), model)
    elif case == "scaler_2_values":
        data = tmp_path / "d.npy"
        shutil.copyfile(tiny_data, data)
        data.with_suffix(".json").write_text(json.dumps({"scaler": {"min": [0, 0], "max": [1, 1]}}))
    elif case == "gp_nan":
        extra = ["-gp", "nan"]
    if case == "gp_nan":
        with pytest.raises(SystemExit) as exc:
            main(tiny_args(data, model, tmp_path / "results", "-e", "1", "-s", "1", *extra))
        one_line_exit_2(exc.value.code, capsys)
    else:
        one_line_exit_2(main(tiny_args(data, model, tmp_path / "results", "-e", "1", "-s", "1", *extra)), capsys)
    assert not (tmp_path / "results").exists()


def test_a_diverged_generator_is_recorded_and_the_checkpoint_written(tiny_data, soc_model, tmp_path):
    from arg_parser import parse_arg
    from train_lstm_gan import TrainLSTMGAN
    argv = tiny_args(tiny_data, soc_model, tmp_path / "results", "-e", "2", "-s", "2")
    trainer = TrainLSTMGAN(parse_arg(argv), argv)
    with torch.no_grad():
        trainer.G.lstm_5.bias_ih_l0.fill_(float("nan"))
    trainer.train()
    [run] = run_dirs(tmp_path / "results")
    assert json.loads((run / "2_epoch" / "metrics.json").read_text())["nonfinite_share"] == 1.0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


# ---- 5. every bad input: one line, exit 2, nothing written -------------------------------------------------------

@pytest.mark.parametrize("flags", [["--model-scale", "nan"], ["--model-scale", "inf"], ["-glr", "-1e-4"],
                                   ["-dlr", "-1"], ["-gab1", "1.0"], ["-dab2", "-0.1"], ["--critic-residual", "-1"],
                                   ["--critic-residual", "nan"]])
def test_bad_numbers_are_one_line(flags, tiny_data, soc_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(tiny_args(tiny_data, soc_model, tmp_path / "results", *flags))
    one_line_exit_2(exc.value.code, capsys)
    assert not (tmp_path / "results").exists()


def test_a_sidecar_that_is_not_an_object(tiny_data, soc_model, tmp_path, capsys):
    data = tmp_path / "d.npy"
    shutil.copyfile(tiny_data, data)
    data.with_suffix(".json").write_text("[1, 2]")
    assert "d.json" in one_line_exit_2(main(tiny_args(data, soc_model, tmp_path / "results")), capsys)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("damage", ["losses_deleted", "losses_damaged", "config_deleted", "config_list"])
def test_resume_of_a_damaged_run(damage, run, capsys):
    name = "losses.csv" if damage.startswith("losses") else "config.json"
    if damage.endswith("deleted"):
        (run / name).unlink()
    else:
        (run / name).write_text("[1, 2]" if name == "config.json" else "garbage\nx,y\n")
    before = files(run)
    assert name in one_line_exit_2(resume(run, "-e", "3"), capsys)
    assert files(run) == before


def test_a_results_dir_that_is_a_file(tiny_data, soc_model, tmp_path, capsys):
    results = tmp_path / "results"
    results.write_text("not a folder")
    err = one_line_exit_2(main(tiny_args(tiny_data, soc_model, results)), capsys)
    assert results.read_text() == "not a folder"
    assert "is a file" in err and "--results-dir" in err and "resume" not in err   # a new run: nothing to resume


def test_disk_full_while_writing_the_checkpoint(run, monkeypatch, capsys):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(run_dir.torch, "save", full)
    err = one_line_exit_2(resume(run, "-e", "3"), capsys)
    assert "free some space" in err
    assert f"-r {run.name} --results-dir {run.parent}" in err   # the whole command that resumes it
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_resume_in_a_read_only_run_folder(run, monkeypatch, capsys):
    def read_only(path, _content):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(run_dir, "atomic_write", read_only)   # root ignores chmod: the file system says no
    before = files(run)
    assert "check that the folder is writable" in one_line_exit_2(resume(run, "-e", "3"), capsys)
    assert files(run) == before


@pytest.mark.parametrize("config", [{}, [1, 2]])
def test_generate_with_a_broken_config(config, tiny_run, tmp_path, capsys):
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run)
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "x.csv"
    code = generate.main(["-r", run.name, "--results-dir", str(tmp_path), "-o", str(out), "--device", "cpu"])
    assert "config.json" in one_line_exit_2(code, capsys)
    assert not out.exists()


def test_evaluate_with_one_sample(tiny_run, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["-r", tiny_run.name, "--results-dir", str(tiny_run.parent), "--n-samples", "1"])
    one_line_exit_2(exc.value.code, capsys)


@pytest.mark.parametrize("case", ["npz", "missing_folder", "threads", "bench", "random_bytes"])
def test_soc_estimator_cli(case, soc_model, tmp_path, capsys):
    seq = tmp_path / "seq.npy"
    np.save(seq, np.random.default_rng(0).random((2, 30, 3), dtype=np.float32))
    argv = ["--model", str(soc_model), "--input", str(seq), "--output", str(tmp_path / "so_out"), "--window", "20",
            "--device", "cpu"]
    if case == "npz":
        np.savez(tmp_path / "seq.npz", x=np.zeros((2, 30, 3)))
        argv[3] = str(tmp_path / "seq.npz")
    elif case == "missing_folder":
        argv[5] = str(tmp_path / "nope" / "so_out")
    elif case == "random_bytes":
        seq.write_bytes(os.urandom(256))
    if case in ("threads", "bench"):
        with pytest.raises(SystemExit) as exc:
            soc_estimator.main(argv + (["--threads", "-2"] if case == "threads" else ["--bench", "-3"]))
        one_line_exit_2(exc.value.code, capsys)
    else:
        err = one_line_exit_2(soc_estimator.main(argv), capsys)
        assert "unsafe" not in err and "allow_pickle" not in err
    assert not list(tmp_path.glob("so_out*"))


def test_soc_estimator_says_the_file_it_wrote(soc_model, tmp_path, capsys):
    seq = tmp_path / "seq.npy"
    np.save(seq, np.random.default_rng(0).random((2, 30, 3), dtype=np.float32))
    assert soc_estimator.main(["--model", str(soc_model), "--input", str(seq), "--output", str(tmp_path / "so_out"),
                               "--window", "20", "--device", "cpu"]) == 0
    assert f"wrote {tmp_path / 'so_out.npy'}" in capsys.readouterr().out
    assert (tmp_path / "so_out.npy").is_file()


@pytest.mark.parametrize("scaler", ["{not json", '{"scaler": "minmax"}',
                                    '{"scaler": {"min": [1, 2, 3], "max": [1, 5, 6]}}'])
def test_lg_dataset_refuses_a_bad_scaler(scaler, tmp_path, capsys):
    side = tmp_path / "side.json"
    side.write_text(scaler)
    out = tmp_path / "w.npy"
    code = lg_dataset.main(["--raw-dir", str(MINI), "--out", str(out), "--files", "0degC/589_Mixed1",
                            "--seq-len", "100", "--scaler-from", str(side)])
    one_line_exit_2(code, capsys)
    assert not out.exists()


def test_lg_dataset_plot_to_an_unknown_format(tmp_path, capsys):
    code = lg_dataset.main(["--raw-dir", str(MINI), "--out", str(tmp_path / "x.xyz"), "--plot", "0degC/589_Mixed1"])
    assert ".xyz" in one_line_exit_2(code, capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", [["--device", "foo"], ["--val-split", "1.0"], ["--batch-size", "0"],
                                   ["--window", "0"], ["damaged_test_data"]])
def test_soc_trainer_bad_input(flags, tmp_path, capsys):
    if flags == ["damaged_test_data"]:
        bad = tmp_path / "t.npy"
        bad.write_bytes(b"\x93NUMPY garbage")
        bad.with_suffix(".json").write_text(json.dumps({"file_index": [], "scaler": None}))
        flags = ["--evaluate", str(ROOT / "soc_models" / "lg_positive_temp_300_steps.h5"), "--test-data", str(bad),
                 "--plots-dir", str(tmp_path / "plots")]
    try:
        code = ts.main(["--out", str(tmp_path / "m.h5"), *flags])
    except SystemExit as exc:
        code = exc.code
    one_line_exit_2(code, capsys)
    assert [p.name for p in tmp_path.iterdir()] in ([], ["t.npy", "t.json"], ["t.json", "t.npy"])


# ---- 6. atomic writes ------------------------------------------------------------------------------------------

def test_atomic_write_keeps_the_old_file_and_no_temporary_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def half_then_full(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError):
        atomic_write(path, half_then_full)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_staged_writes_all_land_or_none(tmp_path):
    from common import UserError, staged_writes
    a, b = tmp_path / "a.json", tmp_path / "b.png"
    a.write_text("old a")
    with pytest.raises(UserError):
        with staged_writes():
            atomic_write(a, "new a")
            atomic_write(b, b"new b")
            assert a.read_text() == "old a" and not b.exists()   # nothing in place before the end
            raise UserError("a later epoch is damaged")
    assert a.read_text() == "old a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with staged_writes():
        atomic_write(a, "new a")
        atomic_write(a, "newer a")   # written twice: the last one lands
        atomic_write(b, b"new b")
    assert a.read_text() == "newer a" and b.read_bytes() == b"new b" and not temporaries(tmp_path)


def test_a_failed_notebook_copy_leaves_no_partial_file(tiny_data, soc_model, tmp_path, monkeypatch, capsys):
    def full(src, dst):
        Path(dst).write_text("{trunc")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(run_dir.shutil, "copyfile", full)
    one_line_exit_2(main(tiny_args(tiny_data, soc_model, tmp_path / "results")), capsys)
    [run] = run_dirs(tmp_path / "results")
    assert not (run / "result.ipynb").exists() and not list(run.glob(".*"))


# ---- 7, 8, 9: other data, a constant scaler, messages ------------------------------------------------------------

def test_resume_on_other_data_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other.npy"
    np.save(other, np.load(json.loads((run / "config.json").read_text())["data_path"]) * 0.5)
    before = files(run)
    assert "SHA-256" in one_line_exit_2(resume(run, "-d", str(other), "-e", "3"), capsys)
    assert files(run) == before


def test_a_ragged_csv_row_is_reported_as_such(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("Time [min],Voltage [V],Current [A],Temperature [degC],Capacity [Ah]\n0,4,1,25,0\n1,4,1,25,0,9,9\n")
    with pytest.raises(lg_dataset.DataError, match="malformed CSV"):
        lg_dataset.read_discharge(csv)


def test_a_missing_raw_dir_is_reported_as_such(tmp_path, capsys):
    code = ts.main(["--raw-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.h5")])
    assert "raw data folder not found" in one_line_exit_2(code, capsys)


def test_resume_of_an_empty_run_name(run, capsys):
    before = files(run.parent)
    assert "no such run" in one_line_exit_2(main(["-r", "", "--results-dir", str(run.parent)]), capsys)
    assert files(run.parent) == before


# ---- 10. signals ----------------------------------------------------------------------------------------------

def test_sigterm_exits_143_after_the_checkpoint(tiny_data, soc_model, tmp_path):
    results = tmp_path / "results"
    code, out = stop_training(tiny_data, soc_model, results, signal.SIGTERM)
    assert code == 143
    [run] = run_dirs(results)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == len(read_losses(run)) - 1


# ---- issue 42, item 1: what a kill leaves ----------------------------------------------------------------------

def killed(signame: str, target: str, match: str, module: str, *argv) -> subprocess.CompletedProcess:
    """Run `python MODULE.py ARGV` and send it SIGNAL right after TARGET(...) returns (tests/kill_driver.py)."""
    return subprocess.run([sys.executable, str(ROOT / "tests" / "kill_driver.py"), signame, target, match, module,
                           *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


def build_args(out: Path, entry: str = "0degC/589_Mixed1") -> list[str]:
    return ["--raw-dir", str(MINI), "--out", str(out), "--files", entry, "--seq-len", "100"]


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the module's tiny run (2 epochs, snapshots at 1 and 2, a scaler): damage it at will."""
    run = tmp_path / "results" / tiny_run.name
    shutil.copytree(tiny_run, run)
    return run


def test_a_kill_mid_write_leaves_a_temporary_that_the_next_writer_of_the_folder_removes(tmp_path):
    out = tmp_path / "w.npy"
    assert lg_dataset.main(build_args(out)) == 0
    before = files(tmp_path)
    done = killed("SIGKILL", "common._write_to", ".w.npy.", "lg_dataset", *build_args(out, "10degC/567_Mixed1"))
    assert done.returncode == -signal.SIGKILL, done.stderr
    [left] = temporaries(tmp_path)   # the kill leaves its temporary; the previous pair is untouched
    assert left.name.startswith(".w.npy.") and {k: v for k, v in files(tmp_path).items() if k != left.name} == before
    live = tmp_path / f".other.csv.{os.getpid()}.tmp"   # a write under way in a live process stays
    live.write_text("half")
    assert lg_dataset.main(build_args(tmp_path / "v.npy")) == 0   # the next write into the folder
    assert temporaries(tmp_path) == [live]


def test_a_kill_between_the_data_and_its_sidecar_leaves_a_pair_that_is_refused(soc_model, tmp_path, capsys):
    out = tmp_path / "w.npy"
    assert lg_dataset.main(build_args(out)) == 0
    old = out.read_bytes()
    done = killed("SIGKILL", "os.replace", "#1", "lg_dataset", *build_args(out, "10degC/567_Mixed1"))
    assert done.returncode == -signal.SIGKILL, done.stderr
    # the sidecar goes first: the new one now sits beside the old data, and says so by its data_sha256
    assert out.read_bytes() == old and "10degC" in out.with_suffix(".json").read_text()
    err = one_line_exit_2(main(tiny_args(out, soc_model, tmp_path / "results")), capsys)
    assert "w.json" in err and "describes another w.npy" in err and not (tmp_path / "results").exists()
    assert lg_dataset.main(build_args(out, "10degC/567_Mixed1")) == 0   # written again: consistent, nothing left
    assert lg_dataset.load_sidecar(out)["data_sha256"] == sha256(out) and not temporaries(tmp_path)


@pytest.mark.parametrize("target, match, left_name", [("common._write_to", ".checkpoint.pt.", ".checkpoint.pt."),
                                                     ("torch.save", "_epoch.", ".3_epoch.")])
def test_a_killed_trainer_leaves_temporaries_that_the_resume_removes(target, match, left_name, run_copy):
    run = run_copy
    done = killed("SIGKILL", target, match, "train_lstm_gan", "-r", run.name, "--results-dir", run.parent,
                  "-e", "3", "-s", "1")
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = [p for p in temporaries(run) if p.parent == run]   # the checkpoint's, or the snapshot's hidden folder
    assert [p.name.startswith(left_name) for p in left] == [True], left
    assert resume(run, "-e", "3", "-s", "1") == 0
    assert not temporaries(run) and not list(run.glob(".*"))
    assert (run / "3_epoch" / "generator.pth").is_file() and len(read_losses(run)) == 4


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_or_sigterm_in_generate_is_one_line(signame, code, tiny_run, tmp_path):
    out = tmp_path / "x.csv"
    done = killed(signame, "sampling.label", "#1", "generate", "-r", tiny_run.name, "--results-dir",
                  tiny_run.parent, "-n", "8", "-o", out, "--device", "cpu")
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_evaluate_is_one_line_and_130(run_copy):
    before = files(run_copy)
    done = killed("SIGINT", "metrics.pca_tsne", "#1", "evaluate", "-r", run_copy.name, "--results-dir",
                  run_copy.parent, "--quick", "--device", "cpu", "--n-samples", "4")
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith("interrupted")
    assert files(run_copy) == before


# ---- items 3, 5, 6: damaged run files, one line naming them, nothing written ------------------------------------

def damage_config(run: Path, damage: str) -> None:
    config = json.loads((run / "config.json").read_text())
    if damage == "no_data_path":
        del config["data_path"]
    elif damage == "scaler_abc":
        config["scaler"] = "abc"
    elif damage == "bounded_without_anchor":   # a --temperature-bound run's generator is built with its anchor
        config["args"]["temperature_bound"] = 4.0
        config.pop("temperature_anchor", None)
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("command", ["generate", "evaluate", "resume"])
@pytest.mark.parametrize("damage", ["no_data_path", "scaler_abc", "bounded_without_anchor"])
def test_a_damaged_config_entry_is_one_line(damage, command, run_copy, capsys):
    run, results = run_copy, run_copy.parent
    damage_config(run, damage)
    before = files(results)
    if command == "generate":
        code = generate.main(["-r", run.name, "--results-dir", str(results), "-o", str(results / "x.csv"),
                              "--device", "cpu"])
    elif command == "evaluate":
        code = evaluate.main(["-r", run.name, "--results-dir", str(results), "--quick", "--device", "cpu"])
    else:
        code = resume(run, "-e", "3")
    err = one_line_exit_2(code, capsys)
    assert "config.json" in err and ("data_path" in err or "scaler" in err or "temperature_anchor" in err), err
    assert files(results) == before


@pytest.mark.parametrize("damage", ["format_only", "epoch_two", "rng_empty", "rng_strings"])
def test_a_damaged_checkpoint_entry_is_one_line(damage, run_copy, capsys):
    ckpt = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    if damage == "format_only":
        ckpt = {"format": 2}
    elif damage == "epoch_two":
        ckpt["epoch"] = "two"
    elif damage == "rng_empty":
        ckpt["rng"] = []
    else:
        ckpt["rng"] = ["a", "b"]
    torch.save(ckpt, run_copy / "checkpoint.pt")
    before = files(run_copy)
    err = one_line_exit_2(resume(run_copy, "-e", "3"), capsys)
    assert "checkpoint.pt" in err and "process(es)" not in err and "start a new run" in err
    assert files(run_copy) == before


def test_a_losses_csv_cut_in_half_is_one_line_for_the_curve_and_the_resume(run_copy, capsys):
    path = run_copy / "losses.csv"
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])   # row 1 cut, row 2 gone
    before = files(run_copy)
    code = evaluate.main(["-r", run_copy.name, "--results-dir", str(run_copy.parent), "--curve", "--device", "cpu"])
    assert "losses.csv" in one_line_exit_2(code, capsys)
    err = one_line_exit_2(resume(run_copy, "-e", "3"), capsys)
    assert "losses.csv" in err and "epoch 2" in err
    assert files(run_copy) == before


def test_a_row_cut_by_a_kill_after_the_checkpoint_is_trained_again(run_copy):
    with open(run_copy / "losses.csv", "a") as f:
        f.write("3,0.12")   # epoch 3's row, cut mid-write (the checkpoint is at 2)
    assert resume(run_copy, "-e", "3") == 0
    rows = read_losses(run_copy)
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"] and all(len(r) == 6 for r in rows)


@pytest.mark.parametrize("index", [{"a": 1}, ["0degC", "25degC"], [{"temp": "0degC", "start": 0}],
                                   [{"temp": "hot", "start": 0, "stop": 24}]],
                         ids=["dict", "strings", "no_stop", "temp_hot"])
def test_a_damaged_file_index_is_one_line(index, tiny_data, soc_model, tmp_path, capsys):
    data = tmp_path / "d.npy"
    shutil.copyfile(tiny_data, data)
    data.with_suffix(".json").write_text(json.dumps({"file_index": index}))
    code = main(tiny_args(data, soc_model, tmp_path / "results", "--condition", "temperature"))
    err = one_line_exit_2(code, capsys)
    assert "d.json" in err and "file_index" in err and "python lg_dataset.py" in err
    assert not (tmp_path / "results").exists()


def test_soc_estimator_names_the_input_that_holds_nan(soc_model, tmp_path, capsys):
    seq = tmp_path / "seq.npy"
    x = np.random.default_rng(0).random((3, 30, 3), dtype=np.float32)
    x[1, 5, 0] = np.nan
    np.save(seq, x)
    code = soc_estimator.main(["--model", str(soc_model), "--input", str(seq), "--output", str(tmp_path / "so"),
                               "--window", "20", "--device", "cpu"])
    err = one_line_exit_2(code, capsys)
    assert err.startswith(f"error: {seq}:") and "NaN" in err and soc_model.name not in err
    assert not list(tmp_path.glob("so*"))


def test_bench_quick_keeps_the_typed_shapes():
    cfg = bench.parse(["--device", "cpu", "--quick", "--batch", "8", "--scale", "0.125"])
    assert (cfg.batch, cfg.scale, cfg.seq_len, cfg.gid) == (8, 0.125, 60, 16)
    assert (bench.parse(["--device", "cpu", "--quick"]).batch, bench.parse(["--device", "cpu"]).batch) == (16, 64)


@pytest.mark.parametrize("flags", [["--batch", "0"], ["--scale", "1e308"], ["--seq-len", "1"], ["--steps", "-1"],
                                   ["--seed", str(2 ** 64)]])
def test_bench_refuses_its_own_flags_by_its_own_names(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse(["--device", "cpu", *flags])
    err = one_line_exit_2(exc.value.code, capsys)
    assert flags[0] in err and "bench.py" in err and "train_lstm_gan" not in err


@pytest.mark.parametrize("flags", [["--temperature-bound", "1e308"], ["--level-mmd", "1e308"],
                                   ["--mode-seeking", "1e9"], ["-glr", "1e308"], ["--seed", str(2 ** 64)],
                                   ["--seed", "-1"], ["--model-scale", "1e308"]])
def test_values_that_cannot_be_meant_are_refused(flags, tiny_data, soc_model, tmp_path, capsys):
    """Beyond a stated maximum a value only makes every loss NaN from epoch 1-2 (or torch refuses the seed)."""
    with pytest.raises(SystemExit) as exc:
        main(tiny_args(tiny_data, soc_model, tmp_path / "results", *flags))
    err = one_line_exit_2(exc.value.code, capsys)
    assert flags[0] in err and ("must be a number in" in err or "2**63 - 1" in err)
    assert not (tmp_path / "results").exists()
