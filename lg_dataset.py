"""LG 18650HG2 data preparation: one parser for the GAN, the SOC estimator, evaluation and tests.

Data: P. Kollmeyer, C. Vidal, M. Naguib, M. Skells, "LG 18650HG2 Li-ion Battery Data and Example Deep Neural
Network xEV SOC Estimator Script", Mendeley Data, V3, 2020, doi:10.17632/cp3473x7xv.3 (CC BY 4.0).

Each file of the dataset is read in one of two forms, chosen by what is on disk:
  - the original Digatron CSV export (metadata block, NUL line, header found by content, units row,
    trailing comma); discharge rows = Status TABLE (drive cycles) or DCH (constant-current discharge);
  - a measurement table (.parquet, or .csv whose first row names the columns) with columns
    Time [s|min|h], Voltage [V], Current [A], Temperature [degC], Capacity [Ah]; discharge rows = every row
    up to and including the last non-zero current (identical to the Status selection on drive cycles).
SOC per file = (Ah - min Ah) / (max Ah - min Ah) over its discharge rows. V, I, T are min-max scaled with the
minimum and maximum over the paper's TRAINING files, and windows are cut per file, never across files.

Build the GAN's training windows (the shipped data/lg_600_data.npy):
    python lg_dataset.py --raw-dir <folder with 0degC/ 10degC/ 25degC/> --out data/lg_600_data.npy
and the SOC estimator's test windows:
    python lg_dataset.py --raw-dir <same> --split test --seq-len 300 --stride 300 --out data/lg_test_300_data.npy
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import OneLineParser, UserError, atomic_pair, atomic_write, cli, sha256

log = logging.getLogger("lg_dataset")

SOURCE = "LG 18650HG2 Li-ion Battery Data (McMaster University), Mendeley Data cp3473x7xv, version 3"
CITATION = ("P. Kollmeyer, C. Vidal, M. Naguib, M. Skells, \"LG 18650HG2 Li-ion Battery Data and Example Deep "
            "Neural Network xEV SOC Estimator Script\", Mendeley Data, V3, 2020, doi:10.17632/cp3473x7xv.3")
LICENSE = "CC BY 4.0"
DOWNLOAD_HINT = "download it from Mendeley Data (doi:10.17632/cp3473x7xv.3)"


PLOT_FORMATS = (".png", ".pdf", ".svg")


class DataError(UserError):
    """One-line, user-facing: names the file, the problem and the fix."""


class Column:
    voltage = 0
    current = 1
    temperature = 2
    soc = 3


FEATURES = ("voltage", "current", "temperature", "soc")
HZ = 10

# The paper's split (from the authors' SOC estimator, "positive temperatures" only).
PAPER_TRAIN_FILES: dict[str, list[str]] = {
    "0degC": ["589_Mixed1", "589_Mixed2", "590_Mixed4", "590_Mixed5", "590_Mixed6", "590_Mixed8"],
    "10degC": ["567_Mixed1", "567_Mixed2", "571_Mixed4", "571_Mixed5", "571_Mixed6", "571_Mixed8"],
    "25degC": ["551_Mixed1", "551_Mixed2", "552_Mixed4", "552_Mixed5", "552_Mixed6", "552_Mixed8"],
}
PAPER_TEST_FILES: dict[str, list[str]] = {
    "0degC": ["589_LA92", "589_UDDS", "589_US06", "590_Mixed7"],
    "10degC": ["582_LA92", "576_UDDS", "567_US06", "571_Mixed7"],  # 582_LA92 is in no public copy we know of
    "25degC": ["551_LA92", "551_UDDS", "551_US06", "552_Mixed7"],
}

# Digatron export: the header row is found by this prefix, then every column is checked by name.
DIGATRON_PREFIX = "Time Stamp,Step,Status"
DIGATRON_NEEDED = ["Status", "Prog Time", "Voltage", "Current", "Temperature", "Capacity"]
DISCHARGE_STATUS = ("TABLE", "DCH")
# Measurement tables (as converted to parquet by xiansee/soc-estimation-nn, or a user's own export).
TABLE_COLUMNS = {"voltage": "Voltage [V]", "current": "Current [A]",
                 "temperature": "Temperature [degC]", "capacity": "Capacity [Ah]"}
TIME_COLUMNS = {"Time [s]": 1.0, "Time [min]": 60.0, "Time [h]": 3600.0}
SOURCE_SUFFIXES = (".csv", ".parquet")  # looked for in this order: the original export wins
OUT_COLUMNS = ["time_s", "voltage", "current", "temperature", "capacity"]
NAN_TEXT = ["", "nan", "NaN"]  # empty cells read as NaN (the row is dropped); any other text is an error


# -----------------------------------------------------------------------------
# readers

def _sniff_csv(path: Path) -> tuple[int, list[str], bool] | None:
    """Find the Digatron header by content. Returns (byte offset of the first data row, header names, whether
    a units row was skipped), or None when the file has no Digatron header."""
    with open(path, "rb") as f:
        offset = 0
        for _ in range(200):  # the released files have it at line 29
            line = f.readline()
            if not line:
                return None
            offset += len(line)
            text = line.decode("latin-1").strip("\r\n\x00 ")
            if text.startswith(DIGATRON_PREFIX):
                names = [c.strip() for c in text.split(",")]
                units = f.readline()
                has_units = b"[V]" in units or b"[A]" in units
                return (offset + len(units) if has_units else offset), names, has_units
    return None


def _numeric(df: pd.DataFrame, columns: list[str], path: Path, first_line: int | None = None) -> pd.DataFrame:
    """Columns to float64; empty cells become NaN (dropped later), any other non-number is a DataError."""
    for col in columns:
        s = df[col]
        if pd.api.types.is_numeric_dtype(s):
            df[col] = s.astype(np.float64)
            continue
        num = pd.to_numeric(s, errors="coerce")
        bad = num.isna() & s.notna() & ~s.astype(str).str.strip().isin(NAN_TEXT)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            where = f"line {first_line + i}" if first_line is not None else f"data row {i + 1}"
            raise DataError(f"{path}: non-numeric value {str(s.iloc[i])!r} in column '{col}' at {where}; "
                            f"fix or delete that row")
        df[col] = num.astype(np.float64)
    return df


def _prog_time_seconds(s: pd.Series, path: Path, first_line: int) -> np.ndarray:
    """'HH:MM:SS.fff' -> seconds; hours may exceed 24 (e.g. '75:00:59.326'), so no datetime parsing."""
    parts = s.str.split(":", n=2, expand=True)
    if parts.shape[1] != 3:
        raise DataError(f"{path}: column 'Prog Time' is not HH:MM:SS.fff; re-export the file from the cycler")
    hms = _numeric(parts.rename(columns={0: "h", 1: "m", 2: "s"}), ["h", "m", "s"], path, first_line)
    bad = hms.isna().any(axis=1) & s.notna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: 'Prog Time' {s.iloc[i]!r} at line {first_line + i} is not HH:MM:SS.fff; "
                        f"fix or delete that row")
    return (hms["h"] * 3600.0 + hms["m"] * 60.0 + hms["s"]).to_numpy()


def _read_digatron(path: Path, offset: int, names: list[str], has_units: bool) -> pd.DataFrame:
    missing = [c for c in DIGATRON_NEEDED if c not in names]
    if missing:
        raise DataError(f"{path}: Digatron header lacks column(s) {', '.join(missing)}; "
                        f"export the file with {', '.join(DIGATRON_NEEDED)}")
    # the released files end every row with a comma: a 15th column without a name, called "Empty" here
    names = [n if n else f"Empty{i}" for i, n in enumerate(names)]
    numbers = ["Voltage", "Current", "Temperature", "Capacity"]
    with open(path, "rb") as f:
        first_line = f.read(offset).count(b"\n") + 1  # 1-based line number of the first data row
        f.seek(offset)
        try:
            df = pd.read_csv(f, header=None, names=names, usecols=DIGATRON_NEEDED, index_col=False,
                             dtype={c: np.float64 for c in numbers} | {"Status": str, "Prog Time": str},
                             skip_blank_lines=False, encoding="latin-1",
                             keep_default_na=False, na_values=NAN_TEXT)
        except ValueError:  # a non-number somewhere: read again as text to say where
            f.seek(offset)
            df = pd.read_csv(f, header=None, names=names, usecols=DIGATRON_NEEDED, index_col=False, dtype=str,
                             skip_blank_lines=False, encoding="latin-1", keep_default_na=False)
            df = _numeric(df, numbers, path, first_line)
    time_s = _prog_time_seconds(df["Prog Time"], path, first_line)
    out = pd.DataFrame({
        # time and Ah relative to the file's first row, the convention of the converted tables
        "time_s": np.round(time_s - time_s[0], 3) if len(df) else time_s,
        "voltage": df["Voltage"].to_numpy(),
        "current": df["Current"].to_numpy(),
        "temperature": df["Temperature"].to_numpy(),
        "capacity": (df["Capacity"] - df["Capacity"].iloc[0]).to_numpy() if len(df) else df["Capacity"],
    })
    discharge = df["Status"].str.strip().isin(DISCHARGE_STATUS).to_numpy()
    out = _drop_nan(out, path)
    return out[discharge[out.index.to_numpy()]]


def _read_table(df: pd.DataFrame, path: Path, first_line: int | None = None) -> pd.DataFrame:
    time_col = next((c for c in TIME_COLUMNS if c in df.columns), None)
    missing = [c for c in TABLE_COLUMNS.values() if c not in df.columns] + ([] if time_col else ["Time [min]"])
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; a measurement table needs "
                        f"{' or '.join(TIME_COLUMNS)}, {', '.join(TABLE_COLUMNS.values())}")
    df = _numeric(df.copy(), [time_col, *TABLE_COLUMNS.values()], path, first_line)
    out = pd.DataFrame({"time_s": np.round(df[time_col].to_numpy() * TIME_COLUMNS[time_col], 3)})
    for key, col in TABLE_COLUMNS.items():
        out[key] = df[col].to_numpy()
    out = _drop_nan(out, path)
    if "Status" in df.columns:  # a table that kept the cycler's Status: use it like the CSV reader
        keep = df["Status"].astype(str).str.strip().isin(DISCHARGE_STATUS).to_numpy()[out.index.to_numpy()]
        return out[keep]
    # no Status column: each drive-cycle test discharges and then rests at zero current for 600 s, so the
    # discharge is everything up to the last non-zero current (checked equal to the TABLE/DCH selection)
    moving = np.flatnonzero(out["current"].to_numpy() != 0)
    return out.iloc[: moving[-1] + 1] if len(moving) else out.iloc[:0]


def _drop_nan(out: pd.DataFrame, path: Path) -> pd.DataFrame:
    nan_rows = out.isna().any(axis=1)
    if nan_rows.any():
        log.info("%s: dropped %d row(s) with NaN", path, int(nan_rows.sum()))
        out = out[~nan_rows]
    return out


def _names_known_columns(path: Path) -> bool:
    """Whether the file's first line is a measurement table's header."""
    with open(path, encoding="latin-1") as f:
        first = {c.strip() for c in f.readline().split(",")}
    return bool(first & (set(TABLE_COLUMNS.values()) | set(TIME_COLUMNS)))


def read_discharge(path: str | Path) -> pd.DataFrame:
    """One file's discharge rows: columns time_s, voltage, current, temperature, capacity (float64).

    The form is chosen by what the file holds (Digatron export or measurement table); NaN rows are dropped
    with a count in the log; any problem is a one-line DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path")
    if path.suffix.lower() == ".parquet":
        try:
            table = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}); re-create it") from None
        out = _read_table(table, path)
    else:
        sniff = _sniff_csv(path)
        if sniff is not None:
            out = _read_digatron(path, *sniff)
        else:
            try:
                table = pd.read_csv(path, dtype=str, skip_blank_lines=True, encoding="latin-1",
                                    keep_default_na=False)
            except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
                table = pd.DataFrame()
                if isinstance(e, pd.errors.ParserError) and _names_known_columns(path):   # a header, a bad row
                    raise DataError(f"{path}: malformed CSV ({' '.join(str(e).split())}); fix or re-export that "
                                    f"row") from None
            known = set(TABLE_COLUMNS.values()) | set(TIME_COLUMNS)
            if not known & {str(c).strip() for c in table.columns}:
                raise DataError(f"{path}: no header row: expected a Digatron header line starting "
                                f"'{DIGATRON_PREFIX}' or a first row naming Time [min], "
                                f"{', '.join(TABLE_COLUMNS.values())}; export the file with its header")
            table.columns = [str(c).strip() for c in table.columns]
            out = _read_table(table, path, first_line=2)
    if len(out) == 0:
        raise DataError(f"{path}: no discharge rows (no Status TABLE/DCH, or no non-zero current); "
                        f"is this a drive-cycle or discharge test?")
    return out.reset_index(drop=True)


def soc_from_capacity(capacity: np.ndarray) -> np.ndarray:
    """SOC = (Ah - min Ah) / (max Ah - min Ah): 1 at the start of the discharge, 0 at its end."""
    capacity = np.asarray(capacity, dtype=np.float64)
    lo, hi = capacity.min(), capacity.max()
    if hi == lo:
        raise DataError("capacity is constant over the discharge rows, so SOC is undefined; "
                        "check the Capacity [Ah] column")
    return (capacity - lo) / (hi - lo)


def file_array(path: str | Path, df: pd.DataFrame | None = None) -> np.ndarray:
    """float64 [rows, 4]: V, I, T (physical units) and SOC of one file's discharge rows (df: already read)."""
    df = read_discharge(path) if df is None else df
    try:
        soc = soc_from_capacity(df["capacity"].to_numpy())
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return np.column_stack([df["voltage"], df["current"], df["temperature"], soc])


# -----------------------------------------------------------------------------
# scaling and windows

def scale(x: np.ndarray, scaler: dict) -> np.ndarray:
    """x[..., :3] physical V, I, T -> [0, 1] by the scaler's min and max; other columns untouched."""
    lo, hi = np.asarray(scaler["min"], np.float64), np.asarray(scaler["max"], np.float64)
    out = np.array(x, dtype=np.float64)
    out[..., :3] = (out[..., :3] - lo) / (hi - lo)
    return out.astype(x.dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else out


def unscale(x: np.ndarray, scaler: dict) -> np.ndarray:
    """Inverse of scale: x[..., :3] in [0, 1] -> volts, amperes, degC."""
    lo, hi = np.asarray(scaler["min"], np.float64), np.asarray(scaler["max"], np.float64)
    out = np.array(x, dtype=np.float64)
    out[..., :3] = out[..., :3] * (hi - lo) + lo
    return out.astype(x.dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else out


def fit_scaler(arrays: list[np.ndarray]) -> dict:
    """min and max of V, I, T over all rows of the given files (the paper scales with training-set stats)."""
    lo = np.min([a[:, :3].min(axis=0) for a in arrays], axis=0)
    hi = np.max([a[:, :3].max(axis=0) for a in arrays], axis=0)
    if np.any(hi == lo):
        raise DataError("a feature is constant over the training files, so it cannot be min-max scaled; "
                        "check the input files")
    return {"min": [float(v) for v in lo], "max": [float(v) for v in hi], "units": ["V", "A", "degC"]}


def window_starts(rows: int, seq_len: int, stride: int) -> range:
    # non-overlapping at stride == seq_len, as the authors' splitter; a tail shorter than a window is dropped
    return range(0, rows - seq_len + 1, stride)


def cut_windows(a: np.ndarray, seq_len: int, stride: int) -> np.ndarray:
    """[rows, F] -> [n, seq_len, F] windows of one file (a copy, C-contiguous)."""
    starts = np.asarray(window_starts(len(a), seq_len, stride), dtype=np.int64)
    if len(starts) == 0:
        return np.empty((0, seq_len, a.shape[1]), a.dtype)
    return a[starts[:, None] + np.arange(seq_len)[None, :]]


# -----------------------------------------------------------------------------
# file lists

def file_list(split: str, temps: list[str] | None = None) -> list[str]:
    """'temp/name' entries of the paper's train or test list, optionally restricted to some temperatures."""
    table = {"train": PAPER_TRAIN_FILES, "test": PAPER_TEST_FILES}[split]
    return [f"{t}/{n}" for t, names in table.items() if temps is None or t in temps for n in names]


def find_source(raw_dir: Path, entry: str) -> Path | None:
    """<raw_dir>/<temp>/<name>.csv (original export) or .parquet (converted table), whichever exists."""
    for suffix in SOURCE_SUFFIXES:
        p = raw_dir / f"{entry}{suffix}"
        if p.is_file():
            return p
    return None


def check_raw_dir(raw_dir: Path, entries: list[str]) -> None:
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: raw data folder not found; pass --raw-dir <folder holding 0degC/ 10degC/ "
                        f"25degC/> ({DOWNLOAD_HINT})")
    for temp in sorted({e.split("/")[0] for e in entries}):
        if not (raw_dir / temp).is_dir():
            raise DataError(f"{raw_dir}: no temperature folder {temp}/; put the {temp} files there "
                            f"({DOWNLOAD_HINT}) or leave {temp} out with --temps / --files")


def load_files(raw_dir: Path, entries: list[str], required: bool
               ) -> tuple[list[str], list[np.ndarray], dict, dict]:
    """Read each 'temp/name' entry. A missing required (training) file is a DataError; a missing optional
    (test) file is a warning and is left out. Returns (entries read, arrays, sha256 per input file, capacity per
    entry in Ah: the Ah counter's range over the discharge, which is what the file's SOC is normalised by)."""
    found, arrays, hashes, capacities = [], [], {}, {}
    for entry in entries:
        path = find_source(raw_dir, entry)
        if path is None:
            looked = " and ".join(f"{entry}{s}" for s in SOURCE_SUFFIXES)
            if required:
                raise DataError(f"{raw_dir}: training file {entry} not found (looked for {looked}); "
                                f"{DOWNLOAD_HINT} or change the list with --files")
            log.warning("test file %s not found in %s (looked for %s); the test split goes on without it",
                        entry, raw_dir, looked)
            continue
        df = read_discharge(path)
        arrays.append(file_array(path, df))
        capacities[entry] = float(np.ptp(df["capacity"].to_numpy()))
        found.append(entry)
        hashes[path.relative_to(raw_dir).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found, arrays, hashes, capacities


def capacity_per_temp(capacities: dict[str, float]) -> dict[str, float]:
    """Mean capacity (Ah) of each temperature's files: Q of the charge-counting check (metrics.coulomb_gap)."""
    temps = dict.fromkeys(entry.split("/")[0] for entry in capacities)
    return {t: float(np.mean([q for e, q in capacities.items() if e.split("/")[0] == t])) for t in temps}


def _windows_for(entries: list[str], arrays: list[np.ndarray], raw_dir: Path, seq_len: int, stride: int,
                 scaler: dict) -> tuple[np.ndarray, list[dict]]:
    """Scale each file, cut its windows; index holds each file's row range in the stacked output."""
    parts, index, start = [], [], 0
    for entry, a in zip(entries, arrays):
        if len(a) < seq_len:
            raise DataError(f"{find_source(raw_dir, entry)}: only {len(a)} discharge rows, fewer than one "
                            f"{seq_len}-step window; the file is truncated: use a complete copy or a shorter "
                            f"--seq-len")
        w = cut_windows(scale(a, scaler), seq_len, stride).astype(np.float32)
        parts.append(w)
        index.append({"file": entry, "temp": entry.split("/")[0], "start": start, "stop": start + len(w),
                      "rows": len(a)})
        start += len(w)
    if not parts:
        raise DataError(f"{raw_dir}: none of the split's files is there; put them there ({DOWNLOAD_HINT})")
    return np.concatenate(parts), index


def soc_windows(raw_dir, split: str = "train", window: int = 300, stride: int = 300,
                scaler: dict | None = None) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The SOC estimator's windows of the paper's train or test files.

    X float32 [n, window, 3] scaled V, I, T; y float32 [n] = SOC at each window's last step; index: one
    {"file", "temp", "start", "stop", "rows"} per file, start/stop being rows of X. scaler None -> fitted on
    the paper's TRAINING files' discharge rows (which must then be present in raw_dir)."""
    raw_dir = Path(raw_dir)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    entries = file_list(split)
    check_raw_dir(raw_dir, entries)
    found, arrays, _, _ = load_files(raw_dir, entries, required=(split == "train"))
    if scaler is None:
        train = arrays if split == "train" else load_files(raw_dir, file_list("train"), required=True)[1]
        scaler = fit_scaler(train)
    w, index = _windows_for(found, arrays, raw_dir, window, stride, scaler)
    return np.ascontiguousarray(w[..., :3]), w[:, -1, Column.soc].copy(), index


# -----------------------------------------------------------------------------
# shipped .npy + sidecar

def sidecar_path(npy_path: str | Path) -> Path:
    return Path(npy_path).with_suffix(".json")


def load_sidecar(npy_path: str | Path) -> dict | None:
    """The <stem>.json written next to an .npy by this module, or None when absent; its scaler and file_index
    checked, and, where it records the data's SHA-256 (data_sha256, written since the pair is written sidecar
    first), that it describes this very .npy: a kill between the two renames leaves the new sidecar beside the old
    data, refused here."""
    p = sidecar_path(npy_path)
    if not p.is_file():
        return None
    try:
        side = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{p}: not valid JSON; rebuild it with python lg_dataset.py") from None
    if not isinstance(side, dict):
        raise DataError(f"{p}: a sidecar must be a JSON object; rebuild it with python lg_dataset.py")
    if side.get("scaler") is not None:
        check_scaler(side["scaler"], p)
    if side.get("file_index") is not None:
        check_file_index(side["file_index"], p)
    if side.get("data_sha256") is not None and Path(npy_path).is_file() \
            and sha256(Path(npy_path)) != side["data_sha256"]:
        raise DataError(f"{p}: describes another {Path(npy_path).name} (its data_sha256 is not the file's: the data "
                        f"changed after the sidecar was written, or a write of the two was interrupted); rebuild "
                        f"both with python lg_dataset.py")
    return side


def temperature_of(name: object) -> float | None:
    """'25degC' -> 25.0; None for anything else."""
    if not isinstance(name, str) or not name.endswith("degC"):
        return None
    try:
        value = float(name.removesuffix("degC"))
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def check_file_index(index: object, path: Path) -> None:
    """A sidecar's file_index: a list of {"temp": "<T>degC", "start": i, "stop": j, ...} with 0 <= i <= j, one per
    file (which windows [i, j) come from which file and ambient temperature)."""
    def problem() -> str | None:
        if not isinstance(index, list):
            return f"is a {type(index).__name__}, not a list of entries"
        for k, item in enumerate(index):
            if not isinstance(item, dict):
                return f"entry {k} is {json.dumps(item)[:40]}, not an object with temp, start and stop"
            missing = [key for key in ("temp", "start", "stop") if key not in item]
            if missing:
                return f"entry {k} lacks {', '.join(missing)}"
            if temperature_of(item["temp"]) is None:
                return f"entry {k}'s temp {json.dumps(item['temp'])[:40]} is not a temperature like \"25degC\""
            start, stop = item["start"], item["stop"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop)) \
                    or not 0 <= start <= stop:
                return f"entry {k}'s start {start!r} and stop {stop!r} are not window numbers 0 <= start <= stop"
        return None
    found = problem()
    if found:
        raise DataError(f"{path}: the file_index {found}; rebuild the data with python lg_dataset.py")


def window_classes(meta: dict) -> tuple[np.ndarray, list[str]]:
    """Each window's ambient temperature class, from a sidecar's file_index -> (int64 [n] index into names,
    names sorted by temperature, e.g. ['0degC', '10degC', '25degC'])."""
    index = meta["file_index"]
    names = sorted({item["temp"] for item in index}, key=temperature_of)
    classes = np.full(index[-1]["stop"], -1, np.int64)
    for item in index:
        classes[item["start"]:item["stop"]] = names.index(item["temp"])
    if (classes < 0).any():
        raise DataError("the sidecar's file_index leaves windows without a file; rebuild with python lg_dataset.py")
    return classes, names


def data_classes(npy_path: str | Path, n: int) -> tuple[np.ndarray, list[str]]:
    """window_classes of the n windows in npy_path, from its sidecar; refused when the sidecar does not index them."""
    side = load_sidecar(npy_path) or {}
    if not side.get("file_index") or side["file_index"][-1]["stop"] != n:
        raise DataError(f"{npy_path}: temperature classes need the sidecar's file_index for these {n} windows "
                        f"(which window comes from which temperature); rebuild the data with python lg_dataset.py")
    return window_classes(side)


def build(raw_dir: str | Path, entries: list[str], seq_len: int, stride: int, required: bool = True,
          scaler: dict | None = None, scaler_files: list[str] | None = None) -> tuple[np.ndarray, dict]:
    """Windows [n, seq_len, 4] float32 (V, I, T scaled; SOC) of the given files, and their sidecar dict.

    scaler None: fitted on scaler_files (default: the files themselves) read from raw_dir."""
    raw_dir = Path(raw_dir)
    check_raw_dir(raw_dir, entries + (scaler_files or []))
    found, arrays, hashes, capacities = load_files(raw_dir, entries, required)
    if not found:
        raise DataError(f"{raw_dir}: none of the listed files was found; check --raw-dir")
    if scaler is None:
        if scaler_files is None or scaler_files == entries:
            scaler_files, scaler_arrays, scaler_capacities = found, arrays, capacities
        else:
            scaler_files, scaler_arrays, more, scaler_capacities = load_files(raw_dir, scaler_files, required=True)
            hashes.update(more)
        # the capacity turns SOC into charge: what the charge-counting check of the labels needs (in the scaler,
        # so that it travels with it into every run's config.json)
        scaler = fit_scaler(scaler_arrays) | {"fitted_on": scaler_files,
                                              "capacity_ah": capacity_per_temp(scaler_capacities)}
    windows, index = _windows_for(found, arrays, raw_dir, seq_len, stride, scaler)
    temps = list(dict.fromkeys(i["temp"] for i in index))  # in the order the files were listed
    meta = {
        "source": SOURCE, "citation": CITATION, "license": LICENSE,
        "files": found,
        "missing_files": [e for e in entries if e not in found],
        "seq_len": seq_len, "stride": stride, "hz": HZ,
        "features": list(FEATURES),
        "shape": list(windows.shape), "dtype": "float32",
        "scaler": scaler,
        "rows_per_temp": {t: sum(i["rows"] for i in index if i["temp"] == t) for t in temps},
        "windows_per_temp": {t: sum(i["stop"] - i["start"] for i in index if i["temp"] == t) for t in temps},
        "file_index": index,
        "capacity_ah": capacities,
        "inputs_sha256": dict(sorted(hashes.items())),
    }
    return windows, meta


def write_outputs(out: Path, windows: np.ndarray, meta: dict) -> None:
    """The .npy and its sidecar, each written atomically, the sidecar first and with the data's SHA-256
    (common.atomic_pair): a failure never leaves partial output, a kill between the renames a pair that
    load_sidecar refuses."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, windows)
    atomic_pair(out, save, sidecar_path(out), meta, sidecar_first=True, indent=1)


# -----------------------------------------------------------------------------
# torch dataset

class LGDataset(torch.utils.data.Dataset):
    """Windows from an .npy [n, T, >=4] (V, I, T, SOC, as written by this module), validated on load."""

    def __init__(self, data_path: str | Path, feature_col_index: list[int] | None = None):
        path = Path(data_path)
        if not path.is_file():
            raise DataError(f"{path}: data file not found; build it with python lg_dataset.py --raw-dir <dir> "
                            f"--out {path}")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}); rebuild it with "
                            f"python lg_dataset.py") from None
        if not isinstance(arr, np.ndarray) or arr.ndim != 3:
            raise DataError(f"{path}: expected a 3-d array [n, seq_len, features], got shape "
                            f"{getattr(arr, 'shape', '?')}; rebuild it with python lg_dataset.py")
        if arr.shape[2] < len(FEATURES):
            raise DataError(f"{path}: expected at least {len(FEATURES)} feature columns {FEATURES}, got "
                            f"{arr.shape[2]}; rebuild it with python lg_dataset.py")
        if arr.shape[0] == 0:
            raise DataError(f"{path}: holds no windows (n == 0); rebuild it from more data")
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise DataError(f"{path}: holds NaN/inf or non-float values; rebuild it with python lg_dataset.py")
        cols = list(range(arr.shape[2])) if feature_col_index is None else list(feature_col_index)
        if any(not 0 <= c < arr.shape[2] for c in cols):
            raise DataError(f"{path}: feature_col_index {cols} out of range for {arr.shape[2]} columns")
        self.path = path
        self.data = torch.from_numpy(np.ascontiguousarray(arr[:, :, cols], dtype=np.float32))
        self.seq_len = int(arr.shape[1])
        self.data_shape = tuple(self.data.shape)
        self.sidecar = load_sidecar(path)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


# -----------------------------------------------------------------------------
# plot (data/README.md figure)

def plot_discharges(raw_dir: Path, entries: list[str], out: Path) -> None:
    """V, I, T, SOC against time in hours for each entry (one column of panels per file)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_raw_dir(raw_dir, entries)
    fig, axes = plt.subplots(4, len(entries), figsize=(6 * len(entries), 9), sharex="col", squeeze=False)
    labels = ["voltage [V]", "current [A]", "temperature [degC]", "SOC [-]"]
    for j, entry in enumerate(entries):
        path = find_source(raw_dir, entry)
        if path is None:
            raise DataError(f"{raw_dir}: file {entry} not found (looked for {entry}.csv and {entry}.parquet)")
        df = read_discharge(path)
        hours = (df["time_s"] - df["time_s"].iloc[0]).to_numpy() / 3600.0
        soc = soc_from_capacity(df["capacity"].to_numpy())
        for k, y in enumerate([df["voltage"], df["current"], df["temperature"], soc]):
            axes[k, j].plot(hours, y, lw=0.4)
            axes[k, j].set_ylabel(labels[k])
            axes[k, j].grid(alpha=0.3)
        axes[0, j].set_title(f"{entry}: {len(df):,} discharge rows at {HZ} Hz")
        axes[-1, j].set_xlabel("time [h]")
    fig.suptitle("LG 18650HG2, Kollmeyer et al., Mendeley Data V3, doi:10.17632/cp3473x7xv.3 (CC BY 4.0)",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format=out.suffix[1:].lower()))
    plt.close(fig)


# -----------------------------------------------------------------------------
# CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="lg_dataset.py",
                      description="Build LG 18650HG2 windows [n, seq_len, 4] (V, I, T, SOC) + sidecar.")
    p.add_argument("--raw-dir", required=True, help="folder holding 0degC/ 10degC/ 25degC/ with <name>.csv "
                   "(original Digatron export) or <name>.parquet (measurement table)")
    p.add_argument("--out", required=True, help="output .npy (sidecar <stem>.json next to it); .png with --plot")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="the paper's training files (default) or test files (scaled with the training scaler)")
    p.add_argument("--seq-len", type=int, default=600, help="window length in 10 Hz steps (default 600)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: --seq-len, non-overlapping)")
    p.add_argument("--temps", nargs="+", default=None, help="restrict the split to these temperature folders")
    p.add_argument("--files", nargs="+", default=None, help="'temp/name' entries replacing the split's list")
    p.add_argument("--scaler-from", default=None,
                   help="take the scaler from this sidecar .json (default: fit on the paper's training files; "
                        "with --files and --split train, on those files)")
    p.add_argument("--plot", nargs="+", default=None, metavar="TEMP/NAME",
                   help="instead of building, plot these files' discharges to --out (.png)")
    args = p.parse_args(argv)
    args.stride = args.stride or args.seq_len
    if args.seq_len < 1 or args.stride < 1:
        p.error("--seq-len and --stride must be positive")
    return args


def read_scaler(path: Path) -> dict:
    """The 'scaler' of a sidecar .json."""
    try:
        scaler = json.loads(path.read_text()).get("scaler")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        scaler = None
    return check_scaler(scaler, path)


def check_scaler(scaler, path: Path) -> dict:
    """{"min": [V, I, T], "max": [V, I, T]}, finite, with min < max everywhere (else scaling gives NaN)."""
    try:
        lo, hi = np.asarray(scaler["min"], dtype=float), np.asarray(scaler["max"], dtype=float)
        valid = lo.shape == hi.shape == (3,) and np.isfinite(lo).all() and np.isfinite(hi).all()
    except (TypeError, KeyError, IndexError, ValueError):
        valid = False
    if not valid:
        raise DataError(f"{path}: no sidecar with a valid 'scaler' entry (min and max of V, I, T); pass the .json "
                        f"written next to the training .npy")
    if not (hi > lo).all():
        raise DataError(f"{path}: the scaler's max equals (or is below) its min for some feature, which would "
                        f"scale to NaN; fit the scaler on data where V, I and T vary")
    return scaler


def run(args: argparse.Namespace) -> None:
    raw_dir, out = Path(args.raw_dir), Path(args.out)
    if not out.parent.is_dir():  # fail before reading anything
        raise DataError(f"{out}: output folder {out.parent}/ does not exist; create it or choose another --out")
    if args.plot and out.suffix.lower() not in PLOT_FORMATS:
        raise DataError(f"{out}: unknown image format {out.suffix or '(none)'}; use one of {', '.join(PLOT_FORMATS)}")
    if args.plot:
        plot_discharges(raw_dir, args.plot, out)
        log.info("wrote %s", out)
        return
    entries = args.files or file_list(args.split, args.temps)
    if args.temps and args.files:
        entries = [e for e in entries if e.split("/")[0] in args.temps]
    scaler, scaler_files = None, None
    if args.scaler_from:
        scaler = read_scaler(Path(args.scaler_from))
    elif args.split == "test":
        scaler_files = file_list("train", args.temps)
    windows, meta = build(raw_dir, entries, args.seq_len, args.stride, required=(args.split == "train"),
                          scaler=scaler, scaler_files=scaler_files)
    meta = {"split": args.split} | meta
    meta["command"] = "python lg_dataset.py " + " ".join(argv_for_sidecar(args))
    write_outputs(out, windows, meta)
    mb = windows.nbytes / 1e6
    log.info("wrote %s: %d windows x %d steps x %d (%.1f MB) from %d files; rows %s; windows %s", out,
             *windows.shape, mb, len(meta["files"]), meta["rows_per_temp"], meta["windows_per_temp"])


def argv_for_sidecar(args: argparse.Namespace) -> list[str]:
    parts = ["--raw-dir", str(args.raw_dir), "--out", str(args.out), "--split", args.split,
             "--seq-len", str(args.seq_len), "--stride", str(args.stride)]
    if args.temps:
        parts += ["--temps", *args.temps]
    if args.files:
        parts += ["--files", *args.files]
    if args.scaler_from:
        parts += ["--scaler-from", str(args.scaler_from)]
    return parts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    return cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
