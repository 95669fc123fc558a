"""lg_dataset.py on real excerpts of the LG 18650HG2 data (tests/fixtures/README.md says which rows).

Expected values are computed here independently (csv module, plain pandas), not through lg_dataset."""

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lg_dataset as L

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).resolve().parent / "fixtures"
MINI = FIX / "mini"
MINI_TRAIN = ["0degC/589_Mixed1", "10degC/567_Mixed1", "25degC/551_Mixed1"]
MINI_TEST = ["0degC/589_UDDS", "10degC/576_UDDS", "25degC/551_UDDS"]
BOTH_FORMS = ["40degC/562_Mixed7", "n20degC/610_US06"]


def digatron_rows(path: Path) -> list[list[str]]:
    """Data rows of a Digatron CSV, by the csv module: everything after the units row."""
    lines = path.read_bytes().decode("latin-1").splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("Time Stamp,Step,Status"))
    return list(csv.reader(lines[head + 2:]))


def table_discharge(path: Path) -> pd.DataFrame:
    """A measurement table's rows up to the last non-zero current, read with plain pandas."""
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    last = np.flatnonzero(df["Current [A]"].to_numpy() != 0)[-1]
    return df.iloc[: last + 1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "lg_dataset.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def run_main(capsys, *args: str) -> tuple[int, str]:
    rc = L.main(list(args))
    return rc, capsys.readouterr().err


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -----------------------------------------------------------------------------
# readers

@pytest.mark.parametrize("entry", BOTH_FORMS)
def test_csv_and_table_forms_give_identical_arrays(entry):
    a = L.file_array(FIX / "csv" / f"{entry}.csv")
    b = L.file_array(FIX / "tables" / f"{entry}.parquet")
    assert a.shape == b.shape == (600, 4)
    assert np.array_equal(a, b)  # V, I, T, SOC bit for bit
    ta = L.read_discharge(FIX / "csv" / f"{entry}.csv")["time_s"].to_numpy()
    tb = L.read_discharge(FIX / "tables" / f"{entry}.parquet")["time_s"].to_numpy()
    assert np.array_equal(ta, tb)


@pytest.mark.parametrize("entry", BOTH_FORMS)
def test_digatron_reader_keeps_table_rows_with_their_values(entry):
    path = FIX / "csv" / f"{entry}.csv"
    raw = path.read_bytes()
    assert b"\r\n" in raw and b"\r\n\x00\r\n" in raw and b"[Cnt],\r\n" in raw  # the released layout is intact
    rows = digatron_rows(path)
    want = np.array([[float(r[8]), float(r[9]), float(r[10])] for r in rows if r[2] in ("TABLE", "DCH")])
    assert len(rows) == 660 and len(want) == 600
    df = L.read_discharge(path)
    assert list(df.columns) == ["time_s", "voltage", "current", "temperature", "capacity"]
    assert np.array_equal(df[["voltage", "current", "temperature"]].to_numpy(), want)


@pytest.mark.parametrize("entry", BOTH_FORMS)
def test_last_nonzero_current_rule_equals_status_selection(entry):
    rows = digatron_rows(FIX / "csv" / f"{entry}.csv")
    status_rows = [i for i, r in enumerate(rows) if r[2] in ("TABLE", "DCH")]
    table = pd.read_parquet(FIX / "tables" / f"{entry}.parquet")
    assert (table["Current [A]"].iloc[600:] == 0).all()  # the excerpt ends with rest rows at zero current
    assert status_rows == list(range(len(L.read_discharge(FIX / "tables" / f"{entry}.parquet"))))


def test_constant_current_dch_file_with_prog_time_beyond_24h():
    path = FIX / "csv" / "25degC" / "549_Dis_2C.csv"
    rows = digatron_rows(path)
    assert rows[0][3] == "74:59:59.325" and all(r[2] == "DCH" for r in rows)
    df = L.read_discharge(path)
    assert len(df) == len(rows) == 27
    assert df["time_s"].iloc[1] == 60.001 and df["time_s"].iloc[-1] == 1548.841  # 75:25:48.166 - 74:59:59.325
    assert np.allclose(df["current"], -6.0, atol=0.01)
    soc = L.soc_from_capacity(df["capacity"].to_numpy())
    assert soc[0] == 1.0 and soc[-1] == 0.0 and np.all(np.diff(soc) < 0)


def test_status_decides_not_the_current():
    # capacity test: 7 PAU rows, then DCH, then PAU (at zero current); only DCH rows are kept
    path = FIX / "csv" / "0degC" / "589_Cap_1C.csv"
    rows = digatron_rows(path)
    dch = [r for r in rows if r[2] == "DCH"]
    df = L.read_discharge(path)
    assert len(df) == len(dch) and rows[0][2] == "PAU"
    assert df["voltage"].iloc[0] == float(dch[0][8]) and df["voltage"].iloc[-1] == float(dch[-1][8])


def test_named_column_table_csv_reads_like_parquet():
    df = L.read_discharge(MINI / "25degC" / "551_UDDS.csv")
    want = table_discharge(MINI / "25degC" / "551_UDDS.csv")
    assert len(df) == len(want) == 400
    assert np.array_equal(df["voltage"].to_numpy(), want["Voltage [V]"].to_numpy())
    assert np.array_equal(df["capacity"].to_numpy(), want["Capacity [Ah]"].to_numpy())


def test_soc_scale_unscale():
    soc = L.soc_from_capacity(np.array([0.0, -0.5, -1.0, -2.0]))
    assert np.allclose(soc, [1.0, 0.75, 0.5, 0.0])
    scaler = {"min": [2.5, -20.0, -5.0], "max": [4.5, 5.0, 45.0]}
    x = np.array([[[2.5, -20.0, -5.0, 0.3], [4.5, 5.0, 45.0, 0.7]]], dtype=np.float32)
    s = L.scale(x, scaler)
    assert s.dtype == np.float32 and np.allclose(s[0, :, :3], [[0, 0, 0], [1, 1, 1]])
    assert np.array_equal(s[..., 3], x[..., 3])
    assert np.allclose(L.unscale(s, scaler), x)


def test_nan_rows_are_dropped_with_a_count(tmp_path, caplog):
    src = FIX / "csv" / "40degC" / "562_Mixed7.csv"
    lines = src.read_bytes().split(b"\r\n")
    for k in (40, 41, 42):  # three data rows lose their voltage
        f = lines[k].split(b",")
        f[8] = b""
        lines[k] = b",".join(f)
    bad = tmp_path / "562_Mixed7.csv"
    bad.write_bytes(b"\r\n".join(lines))
    with caplog.at_level("INFO", logger="lg_dataset"):
        df = L.read_discharge(bad)
    assert len(df) == 597 and "dropped 3 row(s) with NaN" in caplog.text and str(bad) in caplog.text


# -----------------------------------------------------------------------------
# builder CLI on the miniature layout (0degC/ 10degC/ 25degC/, one train + one test file each)

@pytest.fixture(scope="module")
def mini_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    train = cli("--raw-dir", str(MINI), "--out", str(out / "train.npy"), "--seq-len", "100", "--files", *MINI_TRAIN)
    test = cli("--raw-dir", str(MINI), "--out", str(out / "test.npy"), "--split", "test", "--seq-len", "50",
               "--scaler-from", str(out / "train.json"), "--files", *MINI_TEST, "25degC/551_LA92")
    return out, train, test


def test_cli_builds_train_windows_end_to_end(mini_build):
    out, train, _ = mini_build
    assert train.returncode == 0, train.stderr
    x = np.load(out / "train.npy")
    meta = json.loads((out / "train.json").read_text())
    assert x.dtype == np.float32 and x.shape == (12, 100, 4)  # 400 discharge rows per file -> 4 windows each
    for key in ("source", "citation", "license", "files", "seq_len", "stride", "hz", "features", "scaler",
                "inputs_sha256", "file_index"):
        assert key in meta
    assert meta["license"] == "CC BY 4.0" and "10.17632/cp3473x7xv.3" in meta["citation"]
    assert meta["files"] == MINI_TRAIN and meta["seq_len"] == meta["stride"] == 100 and meta["hz"] == 10
    assert meta["features"] == ["voltage", "current", "temperature", "soc"]
    assert meta["inputs_sha256"]["0degC/589_Mixed1.parquet"] == sha(MINI / "0degC" / "589_Mixed1.parquet")
    # scaler = true min and max of the training files' discharge rows, computed independently
    parts = [table_discharge(MINI / f"{e}.parquet") for e in MINI_TRAIN]
    cols = ["Voltage [V]", "Current [A]", "Temperature [degC]"]
    assert meta["scaler"]["min"] == [min(p[c].min() for p in parts) for c in cols]
    assert meta["scaler"]["max"] == [max(p[c].max() for p in parts) for c in cols]
    # windows are cut per file: each file's first window is its own first 100 rows, scaled
    lo, hi = np.array(meta["scaler"]["min"]), np.array(meta["scaler"]["max"])
    for item, part in zip(meta["file_index"], parts):
        first = (part[cols].to_numpy()[:100] - lo) / (hi - lo)
        assert np.array_equal(x[item["start"], :, :3], first.astype(np.float32))
        cap = part["Capacity [Ah]"].to_numpy()
        soc = (cap - cap.min()) / (cap.max() - cap.min())
        assert np.array_equal(x[item["stop"] - 1, :, 3], soc[300:400].astype(np.float32))
    # the capacity each file's SOC is normalised by, and its mean per temperature in the scaler
    caps = {e: float(np.ptp(p["Capacity [Ah]"].to_numpy())) for e, p in zip(MINI_TRAIN, parts)}
    assert meta["capacity_ah"] == pytest.approx(caps)
    for temp, q in meta["scaler"]["capacity_ah"].items():
        assert q == pytest.approx(np.mean([c for e, c in caps.items() if e.startswith(temp + "/")]))


def test_cli_test_split_warns_about_a_missing_file_and_goes_on(mini_build):
    out, _, test = mini_build
    assert test.returncode == 0, test.stderr
    warnings = [ln for ln in test.stderr.splitlines() if "551_LA92" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING") and "not found" in warnings[0]
    meta = json.loads((out / "test.json").read_text())
    train_meta = json.loads((out / "train.json").read_text())
    assert meta["missing_files"] == ["25degC/551_LA92"] and meta["files"] == MINI_TEST
    assert meta["scaler"] == train_meta["scaler"]  # test windows use the training scaler
    assert meta["file_index"][2] == {"file": "25degC/551_UDDS", "temp": "25degC", "start": 16, "stop": 24,
                                     "rows": 400}
    assert np.load(out / "test.npy").shape == (24, 50, 4)


def test_rebuild_is_bit_for_bit(mini_build, tmp_path, capsys):
    out, _, _ = mini_build
    rc, _ = run_main(capsys, "--raw-dir", str(MINI), "--out", str(tmp_path / "again.npy"), "--seq-len", "100",
                     "--files", *MINI_TRAIN)
    assert rc == 0 and sha(tmp_path / "again.npy") == sha(out / "train.npy")


def test_csv_and_table_folders_build_identical_windows(tmp_path, capsys):
    for form in ("csv", "tables"):
        rc, err = run_main(capsys, "--raw-dir", str(FIX / form), "--out", str(tmp_path / f"{form}.npy"),
                           "--seq-len", "100", "--stride", "50", "--files", *BOTH_FORMS)
        assert rc == 0, err
    assert sha(tmp_path / "csv.npy") == sha(tmp_path / "tables.npy")
    keys = json.loads((tmp_path / "csv.json").read_text())["inputs_sha256"]
    assert list(keys) == ["40degC/562_Mixed7.csv", "n20degC/610_US06.csv"]  # the original export was read


def test_soc_windows_from_the_same_parser(mini_build):
    out, _, _ = mini_build
    scaler = json.loads((out / "train.json").read_text())["scaler"]
    X, y, index = L.soc_windows(MINI, "test", window=100, stride=100, scaler=scaler)
    assert X.shape == (12, 100, 3) and y.shape == (12,) and X.dtype == y.dtype == np.float32
    assert [i["file"] for i in index] == MINI_TEST
    part = table_discharge(MINI / "0degC" / "589_UDDS.parquet")
    cap = part["Capacity [Ah]"].to_numpy()
    assert y[0] == np.float32((cap[99] - cap.min()) / (cap.max() - cap.min()))
    assert y[3] == 0.0  # the last window ends at the end of the discharge
    with pytest.raises(L.DataError, match="training file 0degC/589_Mixed2 not found"):
        L.soc_windows(MINI, "test", window=100, stride=100)  # no scaler: needs the paper's training files


# -----------------------------------------------------------------------------
# LGDataset

def test_lgdataset_loads_and_selects_columns(mini_build):
    out, _, _ = mini_build
    ds = L.LGDataset(out / "train.npy", feature_col_index=[0, 1, 2])
    assert len(ds) == 12 and ds.seq_len == 100 and ds.data_shape == (12, 100, 3)
    assert ds.data.dtype == torch.float32 and ds[0].shape == (100, 3)
    assert L.load_sidecar(out / "train.npy")["seq_len"] == 100 and L.load_sidecar(out / "nothing.npy") is None


@pytest.mark.parametrize("content, problem", [
    (None, "not found"),
    (b"not an npy file", "not a readable .npy"),
    (np.zeros((4, 10), np.float32), "3-d array"),
    (np.zeros((4, 10, 3), np.float32), "at least 4 feature columns"),
    (np.full((4, 10, 4), np.nan, np.float32), "NaN/inf"),
    (np.zeros((0, 10, 4), np.float32), "no windows"),
])
def test_lgdataset_rejects_bad_files(tmp_path, content, problem):
    path = tmp_path / "bad.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content)
    with pytest.raises(L.DataError, match=problem) as e:
        L.LGDataset(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# bad input: one line naming the file and the problem, exit 2, nothing written

def edited_mixed7(tmp_path: Path, edit) -> Path:
    """A raw dir holding an edited copy of the 40degC/562_Mixed7 CSV excerpt."""
    raw = tmp_path / "raw"
    (raw / "40degC").mkdir(parents=True)
    lines = (FIX / "csv" / "40degC" / "562_Mixed7.csv").read_bytes().split(b"\r\n")
    (raw / "40degC" / "562_Mixed7.csv").write_bytes(b"\r\n".join(edit(lines)))
    return raw


def drop_header(lines):
    return [ln for ln in lines if not ln.startswith(b"Time Stamp,")]


def rename_voltage(lines):
    return [ln.replace(b",Voltage,", b",Volt,") if ln.startswith(b"Time Stamp,") else ln for ln in lines]


def text_in_current(lines):
    f = lines[100].split(b",")
    f[9] = b"n/a"
    return lines[:100] + [b",".join(f)] + lines[101:]


@pytest.mark.parametrize("case, problem", [
    ("no_raw_dir", "raw data folder not found"),
    ("no_temp_folder", "no temperature folder 25degC/"),
    ("missing_train_file", "training file 0degC/589_Mixed2 not found (looked for 0degC/589_Mixed2.csv and "
                           "0degC/589_Mixed2.parquet)"),
    ("no_header", "no header row"),
    ("missing_column", "lacks column(s) Voltage"),
    ("table_missing_column", "missing column(s) Capacity [Ah]"),
    ("non_numeric", "non-numeric value 'n/a' in column 'Current' at line 101"),
    ("short_file", "only 600 discharge rows, fewer than one 700-step window"),
    ("no_out_folder", "output folder"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, problem):
    out = tmp_path / "out.npy"
    files, seq = ["40degC/562_Mixed7"], "700" if case == "short_file" else "100"
    raw = tmp_path / "raw"
    if case == "no_raw_dir":
        named = raw
    elif case == "no_temp_folder":
        shutil.copytree(MINI / "0degC", raw / "0degC")
        files, named = ["0degC/589_Mixed1", "25degC/551_Mixed1"], raw
    elif case == "missing_train_file":
        raw = named = MINI
        files = ["0degC/589_Mixed1", "0degC/589_Mixed2"]
    elif case == "table_missing_column":
        (raw / "40degC").mkdir(parents=True)
        pd.read_parquet(FIX / "tables" / "40degC" / "562_Mixed7.parquet").drop(columns="Capacity [Ah]").to_csv(
            raw / "40degC" / "562_Mixed7.csv", index=False)
        named = raw / "40degC" / "562_Mixed7.csv"
    elif case == "no_out_folder":
        raw, out = FIX / "csv", tmp_path / "missing" / "out.npy"
        named = out
    else:
        edit = {"no_header": drop_header, "missing_column": rename_voltage, "non_numeric": text_in_current,
                "short_file": lambda lines: lines}[case]
        raw = edited_mixed7(tmp_path, edit)
        named = raw / "40degC" / "562_Mixed7.csv"
    rc, err = run_main(capsys, "--raw-dir", str(raw), "--out", str(out), "--seq-len", seq, "--files", *files)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert problem in err and str(named) in err
    assert list(out.parent.glob("out*")) == [] if out.parent.is_dir() else True  # no partial output


def test_bad_input_via_subprocess(tmp_path):
    # the real entry point: exit status 2, a single stderr line, no traceback, nothing written
    raw = edited_mixed7(tmp_path, text_in_current)
    p = cli("--raw-dir", str(raw), "--out", str(tmp_path / "out.npy"), "--files", "40degC/562_Mixed7")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "562_Mixed7.csv" in p.stderr
    assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out.json").exists()
    p = cli("--raw-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out.npy"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "nowhere" in p.stderr


def test_shipped_data_matches_its_sidecar():
    # the committed windows (built from the real tables, see data/README.md) agree with their sidecars
    for name, shape in (("lg_600_data", (2030, 600, 4)), ("lg_test_300_data", (2936, 300, 4))):
        npy = ROOT / "data" / f"{name}.npy"
        meta = L.load_sidecar(npy)
        arr = np.load(npy, mmap_mode="r")
        assert arr.shape == shape == tuple(meta["shape"]) and arr.dtype == np.float32
        assert meta["file_index"][-1]["stop"] == shape[0]
        assert sum(meta["windows_per_temp"].values()) == shape[0]
    test_meta = L.load_sidecar(ROOT / "data" / "lg_test_300_data.npy")
    assert test_meta["missing_files"] == ["10degC/582_LA92"]
    assert test_meta["scaler"] == L.load_sidecar(ROOT / "data" / "lg_600_data.npy")["scaler"]
