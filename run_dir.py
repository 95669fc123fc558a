"""A results folder (results/<unix time>_<trainer>) as one object: its config.json, losses.csv, checkpoint.pt,
best_*.pth and <N>_epoch/ folders. The trainer writes runs through it, generate.py and evaluate.py read them
through it. Every file is written atomically; one process at a time may write a run (lock); what a killed writer
left (hidden temporaries of dead processes) is removed when the run is next opened or locked. Each file is
checked as it is read, so a damaged one is one line naming it."""
import csv
import errno
import fcntl
import io
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import UserError, atomic_json, atomic_write, in_words, remove_stale_temporaries, sha256
from lg_dataset import DataError, check_scaler

LOSS_COLUMNS = ("g_loss", "d_loss", "d_real", "d_fake", "gp")
CHECKPOINT_FORMAT = 2   # 2: RNG states as tensors and lists, no loss history; 1 (no key): numpy's RNG state as
# an array and the loss history, still read: numpy's array reconstruction is all it needs beyond torch's safe types
LEGACY_SAFE_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


LEGACY_EPOCH_TMP = re.compile(r"\.\d+_epoch\.tmp")   # the hidden epoch folder of the code before pids in names
TRAINER = "train_lstm_gan.py"


def write_error(path: Path, err: OSError, then: str) -> UserError:
    """A failed write (read-only file system, disk full, a file where a folder should be) as one line; then: what
    to do once the cause is fixed (resume, or start again)."""
    fix = "free some space" if err.errno == errno.ENOSPC else "check that the folder is writable"
    return UserError(f"{path}: cannot write ({err.strerror or type(err).__name__}); {fix} and {then}")


def network_error(err: Exception) -> str:
    """Why torch.load or load_state_dict refused a saved network, short and in whole words: the first of its
    shape mismatches (and how many there are), the first line of the refusal of a pickled object."""
    text = " ".join(str(err).split())
    mismatches = re.findall(r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) "
                            r"from checkpoint, the shape in current model is (torch.Size\(\[[^\]]*\]\))", text)
    if mismatches:
        name, saved, here = mismatches[0]
        more = f" and {len(mismatches) - 1} more" if len(mismatches) > 1 else ""
        return f"{type(err).__name__}: {name} is {saved[len('torch.Size('):-1]} in the file, " \
               f"{here[len('torch.Size('):-1]} here{more}"
    keys = re.search(r"(Missing|Unexpected) key\(s\) in state_dict: ((?:\"[^\"]+\"(?:, )?)+)", text)
    if keys:
        names = re.findall(r"\"([^\"]+)\"", keys.group(2))
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        return f"{type(err).__name__}: {keys.group(1).lower()} key {names[0]}{more}"
    if "Weights only load failed" in text or "weights_only" in text:
        return f"{type(err).__name__}: it holds pickled objects, not only weights (refused: loading could run code)"
    return f"{type(err).__name__}: {in_words(text)}" if text else type(err).__name__


def read_network(path: Path) -> dict:
    """A saved network's state dict (generator.pth, discriminator.pth, best_*.pth), safely (weights_only: loading
    never runs code), without the 'module.' prefix that the original's DataParallel files carry. Raises what
    torch.load raises; each caller says what the file was for."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in state.items()}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = None

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, results_dir: str | Path, trainer_name: str) -> "RunDir":
        """results/<unix time>_<trainer>; mkdir is atomic, so two runs started in the same second still get
        different folders (the later one takes the next free second)."""
        base = Path(results_dir)
        try:
            base.mkdir(parents=True, exist_ok=True)
            stamp = int(time.time())
            while True:
                try:
                    (base / f"{stamp}_{trainer_name}").mkdir()
                    return cls(base / f"{stamp}_{trainer_name}")
                except FileExistsError:
                    stamp += 1
        except OSError as err:
            if base.exists() and not base.is_dir():
                raise UserError(f"{base}: is a file, not a folder; pass a folder as --results-dir (it is created "
                                f"when missing)") from None
            raise write_error(base, err, "start the run again") from None

    @classmethod
    def open(cls, results_dir: str | Path, name: str) -> "RunDir":
        """An existing run. What killed writers left in it (their hidden temporaries) goes now."""
        path = Path(results_dir) / name
        if not name.strip() or not path.is_dir() or path.resolve() == Path(results_dir).resolve():
            raise UserError(f"{path}: no such run; list {results_dir} for run names or pass --results-dir")
        run = cls(path)
        run.remove_stale_temporaries()
        return run

    def remove_stale_temporaries(self, legacy: bool = False) -> list[Path]:
        """The temporaries of dead processes in the run folder and its epoch folders (common.remove_stale_
        temporaries); legacy (only under the lock: the trainer alone writes them): the pid-less hidden epoch
        folders of older versions too."""
        removed = remove_stale_temporaries(self.path)
        for folder in self.path.glob("*_epoch"):
            removed += remove_stale_temporaries(folder)
        if legacy:
            for folder in self.path.iterdir():
                if LEGACY_EPOCH_TMP.fullmatch(folder.name) and folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
        return removed

    def resume_command(self) -> str:
        """The command that resumes this run, wherever its results folder is."""
        return f"python {TRAINER} -r {shlex.quote(self.name)} --results-dir {shlex.quote(str(self.path.parent))}"

    def _then(self) -> str:
        """After a failed write: resume when a checkpoint exists, else start again."""
        if self.checkpoint_path.is_file():
            return f"resume with: {self.resume_command()}"
        return "start the run again (it has no checkpoint yet)"

    def lock(self) -> None:
        """One writer per run: an exclusive lock on the folder itself, held until the process ends or unlock().
        Holding it, the trainer removes what an earlier killed trainer left (hidden epoch folders included)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{self.path}: another process is training this run; wait for it to finish "
                            f"(or stop it) and resume then") from None
        self._lock = fd
        self.remove_stale_temporaries(legacy=True)

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # ---- config.json ------------------------------------------------------------------------------------------

    def read_config(self) -> dict:
        """config.json, with what generate.py, evaluate.py and a resume take from it checked (one line naming the
        file and the entry, rather than a traceback deep in a command)."""
        path = self.path / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            config = None
        if not isinstance(config, dict) or not isinstance(config.get("args"), dict) or "seq_len" not in config:
            raise UserError(f"{path}: missing or damaged; is {self.path} a run folder written by "
                            f"train_lstm_gan.py? (restore config.json or start a new run)")
        problem = config_problem(config)
        if problem:
            raise UserError(f"{path}: {problem}; restore the run's config.json (train_lstm_gan.py wrote it at the "
                            f"start of the run) or start a new run")
        return config

    def check_data(self, data_path: Path) -> None:
        """A resume trains on the data the run was trained on: the SHA-256 config.json records."""
        recorded = self.read_config().get("data_sha256")
        if not isinstance(recorded, str):
            raise UserError(f"{self.path / 'config.json'}: records no data_sha256 (the SHA-256 of the data the run "
                            f"was trained on), so the data cannot be checked; restore the run's config.json, or "
                            f"start a new run")
        if sha256(data_path) != recorded:
            raise UserError(f"{data_path}: not the data this run was trained on (its SHA-256 differs from "
                            f"config.json's data_sha256); resume with the run's own data (drop -d) or start a new run")

    def write_config(self, config: dict) -> None:
        try:
            atomic_json(self.path / "config.json", config)
        except OSError as err:
            raise write_error(self.path / "config.json", err, self._then()) from None

    def record_resume(self, epoch: int, args: dict) -> None:
        """config.json keeps the flags the run trains with now and a list of its resumptions."""
        config = self.read_config()
        config.setdefault("resumed", []).append({"at_epoch": epoch, "command": sys.argv,
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        config["args"] = args
        self.write_config(config)

    # ---- losses.csv ---------------------------------------------------------------------------------------------

    def start_losses(self) -> None:
        try:
            atomic_write(self.path / "losses.csv", ",".join(("epoch",) + LOSS_COLUMNS) + "\r\n")
        except OSError as err:
            raise write_error(self.path / "losses.csv", err, self._then()) from None

    def read_losses(self) -> list[list[str]]:
        """The header and every complete row: epochs 1, 2, ... in order, each with its five numbers. A last line
        without its line end (a row being appended, or cut by a kill) is left out; any other damage is refused."""
        path = self.path / "losses.csv"
        try:
            text = path.read_bytes().decode("ascii")
            text = text[:text.rfind("\n") + 1]   # complete lines only
            rows = list(csv.reader(io.StringIO(text, newline="")))
            if not rows or rows[0] != ["epoch", *LOSS_COLUMNS]:
                raise ValueError("no header")
            for k, row in enumerate(rows[1:], 1):
                if len(row) != len(rows[0]) or row[0] != str(k):
                    raise ValueError(f"row {k}")
                [float(v) for v in row[1:]]   # nan and inf are numbers here: a diverged run records them
        except (OSError, ValueError, csv.Error):   # UnicodeDecodeError is a ValueError
            raise UserError(f"{path}: missing or damaged (each row: the epoch, counted from 1, and "
                            f"{', '.join(LOSS_COLUMNS)}); restore it, or start a new run") from None
        return rows

    def truncate_losses(self, epoch: int) -> None:
        """Rows written after the checkpoint (epoch) are dropped: they will be trained again. Rows up to it must
        all be there: a file cut short (or rows lost) would leave a hole in the run's record."""
        rows = self.read_losses()
        if len(rows) - 1 < epoch:
            raise UserError(f"{self.path / 'losses.csv'}: records epochs 1..{len(rows) - 1} but checkpoint.pt is at "
                            f"epoch {epoch} (the file was cut short); restore losses.csv, or start a new run")
        try:
            atomic_write(self.path / "losses.csv", "".join(",".join(r) + "\r\n" for r in rows[:epoch + 1]))
        except OSError as err:
            raise write_error(self.path / "losses.csv", err, self._then()) from None

    def append_losses(self, epoch: int, losses: dict[str, float]) -> None:
        try:
            with open(self.path / "losses.csv", "a", newline="") as f:
                csv.writer(f).writerow([epoch] + [repr(losses[k]) for k in LOSS_COLUMNS])
        except OSError as err:
            raise write_error(self.path / "losses.csv", err, self._then()) from None

    # ---- checkpoint.pt, best_*.pth --------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def read_checkpoint(self) -> dict:
        """The checkpoint to resume from, with what a resume needs checked, and losses.csv recording every epoch up
        to it. weights_only=True: a checkpoint holds tensors, numbers, strings, lists and dicts, so loading one can
        never run code (a pickled object's __reduce__ is refused)."""
        path = self.checkpoint_path
        if not path.is_file():
            raise UserError(f"{path}: the run has no checkpoint to resume from (it stopped before its first save); "
                            f"start a new run instead")
        try:
            with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:   # damaged, foreign, or holding objects that safe loading refuses
            raise UserError(f"{path}: not a loadable checkpoint ({type(err).__name__}; a damaged file, or one "
                            f"written by an older version or by someone else); start a new run instead") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("format", 1) not in (1, CHECKPOINT_FORMAT):
            raise UserError(f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT} (written by another version "
                            f"of train_lstm_gan.py); start a new run instead")
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise UserError(f"{path}: damaged ({problem}); start a new run instead, or restore the file")
        recorded = len(self.read_losses()) - 1   # a resume keeps every epoch's row up to the checkpoint
        if recorded < checkpoint["epoch"]:
            raise UserError(f"{self.path / 'losses.csv'}: records epochs 1..{recorded} but checkpoint.pt is at epoch "
                            f"{checkpoint['epoch']} (the file was cut short); restore losses.csv, or start a new run")
        return checkpoint

    def write_checkpoint(self, state: dict) -> None:
        self.save(self.checkpoint_path, {**state, "format": CHECKPOINT_FORMAT})

    def write_best(self, name: str, state_dict: dict, loss: float, epoch: int) -> None:
        self.save(self.path / f"{name}.pth", state_dict)
        self.save(self.path / f"{name}.json", {"loss": loss, "epoch": epoch})

    def save_copy(self, source: Path, name: str) -> None:
        """A copy of source (the result notebook) in the run folder: complete or absent."""
        try:
            atomic_write(self.path / name, lambda tmp: shutil.copyfile(source, tmp))
        except OSError as err:
            raise write_error(self.path / name, err, self._then()) from None

    def save(self, path: Path, obj) -> None:
        """obj to path: JSON for a .json, torch.save otherwise; a failed write is one line."""
        try:
            if path.suffix == ".json":
                atomic_json(path, obj)
            else:
                atomic_write(path, lambda tmp: torch.save(obj, tmp))
        except OSError as err:
            raise write_error(path, err, self._then()) from None

    # ---- <N>_epoch/ -------------------------------------------------------------------------------------------------

    def epochs(self) -> dict[int, Path]:
        """{epoch: folder} of the saved epochs (<N>_epoch/ holding generator.pth), in epoch order."""
        found = {}
        for p in self.path.glob("*_epoch"):
            head = p.name[:-len("_epoch")]
            if head.isdigit() and (p / "generator.pth").is_file():
                found[int(head)] = p
        return dict(sorted(found.items()))

    def epoch(self, epoch: int | None) -> tuple[int, Path]:
        """(epoch, folder): the given saved epoch, or the latest when None."""
        epochs = self.epochs()
        if not epochs:
            raise UserError(f"{self.path}: no saved epoch (<N>_epoch/generator.pth) yet; train until the first "
                            f"-s interval")
        epoch = max(epochs) if epoch is None else epoch
        if epoch not in epochs:
            raise UserError(f"{self.path}: epoch {epoch} was not saved; saved epochs: {', '.join(map(str, epochs))}")
        return epoch, epochs[epoch]

    def commit_epoch(self, epoch: int, fill: Callable[[Path], None]) -> Path:
        """fill(folder) writes <epoch>_epoch/ in a hidden folder (.<epoch>_epoch.<pid>.tmp) that is then renamed:
        a folder that exists is complete. A failure leaves no hidden folder; a kill leaves one, which the next
        opening of the run removes."""
        out, tmp = self.path / f"{epoch}_epoch", self.path / f".{epoch}_epoch.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            fill(tmp)
            shutil.rmtree(out, ignore_errors=True)   # an evaluation of this epoch from before a crash
            os.replace(tmp, out)
        except OSError as err:
            raise write_error(out, err, self._then()) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


# ----------------------------------------------------------------------------------------------------------------
# what a read file must hold

def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _whole(x, minimum: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def config_problem(config: dict) -> str | None:
    """What is wrong with the entries of a config.json that the commands use (None: nothing)."""
    if not _whole(config["seq_len"], 2):
        return f"seq_len {config['seq_len']!r} is not a number of steps"
    if not isinstance(config.get("data_path"), str) or not config["data_path"].strip():
        return "it records no data_path (the training data)"
    if config.get("scaler") is not None:
        try:
            check_scaler(config["scaler"], Path("config.json"))
        except DataError:
            return f"its scaler {json.dumps(config['scaler'])[:60]} is not min and max of V, I, T"
        capacity = config["scaler"].get("capacity_ah")
        if capacity is not None and not (isinstance(capacity, dict)
                                         and all(_number(q) and q > 0 for q in capacity.values())):
            return f"its scaler's capacity_ah {json.dumps(capacity)[:60]} is not a capacity in Ah per class"
    names, shares = config.get("condition_classes") or [], config.get("condition_shares") or []
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return "its condition_classes are not a list of class names"
    if names and not (isinstance(shares, list) and len(shares) == len(names) and all(_number(x) and x >= 0
                                                                                      for x in shares)
                      and sum(shares) > 0):
        return f"its condition_shares {shares!r} are not one share >= 0 per class of {names}"
    if config["args"].get("temperature_bound"):
        anchor = config.get("temperature_anchor")
        if not (isinstance(anchor, list) and len(anchor) == 2 and isinstance(anchor[0], list)
                and len(anchor[0]) == len(names) and all(map(_number, anchor[0])) and _number(anchor[1])):
            return (f"the run is bounded (--temperature-bound {config['args']['temperature_bound']}) but its "
                    f"temperature_anchor {anchor!r} is not [each class's mean temperature, the bound]")
    return None


def checkpoint_problem(checkpoint: dict) -> str | None:
    """What a checkpoint lacks that a resume needs (None: nothing)."""
    for key in ("generator", "discriminator", "g_optim", "d_optim", "best", "args"):
        if not isinstance(checkpoint.get(key), dict):
            return f"no {key} entry"
    if not _whole(checkpoint.get("epoch"), 1):
        return f"epoch {checkpoint.get('epoch')!r} is not an epoch number"
    best = checkpoint["best"]
    if not all(isinstance(best.get(k), (int, float)) for k in ("g_loss", "g_epoch", "d_loss", "d_epoch")):
        return "its best entry lacks the best losses and epochs"
    rng = checkpoint.get("rng")
    if not (isinstance(rng, list) and rng and all(isinstance(r, dict) and {"python", "numpy", "torch", "sampler"}
                                                   <= set(r) for r in rng)):
        return "no random streams (rng: one entry per training process)"
    return None
