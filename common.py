"""What every command shares: the one-line error for bad input (UserError, OneLineParser, cli), the device
resolution, the one atomic file write (and the pair of a data file with its sidecar), the small file helpers
(project_default, sha256, check_writable), the seed's type, and glibc's heap setting for the CPU steps."""
import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

PROJECT_DIR = Path(__file__).resolve().parent


class UserError(ValueError):
    """Bad input: printed as one line (file, problem, fix), exit code 2, nothing written."""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; users asked for one line naming the problem."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"error: {message} (see python {self.prog} -h)\n")
        sys.exit(2)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value
    return parse


SEED_MAX = 2 ** 63 - 1   # torch's generators take 64 bits; the commands add small offsets (rank, round, epoch)


def seed_type(text: str) -> int:
    """An argparse type: a seed, an integer 0 .. 2**63 - 1 (numpy refuses negative seeds, torch those of > 64 bits)."""
    value = int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63 - 1 ({SEED_MAX}), got {text}")
    return value


def in_words(text: object, limit: int = 120) -> str:
    """text on one line, cut after whole words to about limit characters (' ...' says where)."""
    words, line = str(text).split(), ""
    for word in words:
        if line and len(line) + 1 + len(word) > limit:
            return line + " ..."
        line = f"{line} {word}" if line else word
    return line


class Terminated(BaseException):
    """A SIGTERM, raised where the command is, so that it unwinds as after Ctrl-C (its temporaries removed)."""


def _terminate(_signum, _frame):
    raise Terminated


def cli(run: Callable[[], object]) -> int:
    """A command's main: its UserError becomes `error: ...` on stderr and exit code 2; Ctrl-C (SIGINT) and SIGTERM
    one line and 130 / 143, as shells expect (an atomic write under way leaves the previous file and no temporary;
    the trainer catches both itself while it trains, to finish the epoch); an int that run returns is the exit code,
    anything else means 0."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        code = run()
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        name, signum = ("Ctrl-C", signal.SIGINT) if isinstance(stop, KeyboardInterrupt) else ("SIGTERM",
                                                                                            signal.SIGTERM)
        print(f"interrupted ({name}): stopped before finishing; files being written were not replaced",
              file=sys.stderr)
        return 128 + signum
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def resolve_device(name: str, gpus: list[int] | None = None) -> tuple[torch.device, list[int]]:
    """--device (auto | cpu | cuda | cuda:N) and --gpus -> (the main device, the GPU ids to use)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        if gpus:
            raise UserError(f"--gpus {gpus}: GPU ids given but the device is cpu; drop --gpus or use --device cuda")
        return device, []
    if device.type != "cuda":
        raise UserError(f"--device {name}: unsupported device type; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    count = torch.cuda.device_count()
    ids = gpus if gpus else ([device.index] if device.index is not None else list(range(count)))
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise UserError(f"--gpus: GPU id(s) {bad} do not exist; this machine has {count} GPU(s) (ids 0..{count - 1})")
    return torch.device("cuda", ids[0]), ids


# ----------------------------------------------------------------------------------------------------------------
# atomic writes

TEMPORARY = re.compile(r"\..+\.(\d+)\.tmp")   # .<name>.<pid>.tmp: a write in progress of process <pid>


def temporary_path(path: Path) -> Path:
    """Where this process writes path before renaming it into place: hidden, in the same folder (a rename within
    one file system is atomic), named by the writer's pid so that a later writer can tell a dead one's."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (a zombie counts: its parent has not reaped it yet)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    except (OverflowError, ValueError):   # no process can have this id
        return False
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries (.<name>.<pid>.tmp, files or folders) that processes no longer running left in
    folder: what a SIGKILL or a power cut leaves mid-write. Those of live processes stay (writes under way).
    Pids are this machine's: on a folder shared between machines or PID namespaces, a live writer elsewhere looks
    dead. -> the paths removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:   # no folder yet, or not readable: nothing to clean
        return removed
    for entry in entries:
        match = TEMPORARY.fullmatch(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:   # removed meanwhile by another writer, or not ours to remove
            pass
    return removed


def _write_to(tmp: Path, content: str | bytes | Callable[[Path], object]) -> None:
    if isinstance(content, str):
        tmp.write_text(content, encoding="utf-8")
    elif isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        content(tmp)


_staged: dict[Path, Path] | None = None   # within staged_writes(): {path: its written temporary}


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], object]) -> None:
    """Write text, bytes, or whatever content(tmp_path) writes, to a hidden temporary file in path's folder, then
    rename it over path: a reader (or a resume) never sees half a file, and an interrupted or failed write (a full
    disk, Ctrl-C) leaves the previous file as it was and no temporary file behind. A SIGKILL cannot be caught: it
    leaves the temporary, which the next write into the same folder removes (remove_stale_temporaries). Within
    staged_writes() the rename waits for the end of the block."""
    path = Path(path)
    remove_stale_temporaries(path.parent)
    tmp = temporary_path(path)
    try:
        _write_to(tmp, content)
        if _staged is not None:
            _staged[path] = tmp
            return
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_writes():
    """Every atomic_write in the block writes its temporary and renames nothing; at the end of the block all are
    renamed into place, one after the other, or on an exception (a UserError, Ctrl-C) all removed: a command that
    fails part way (evaluate.py --epoch all on a damaged epoch) leaves every file as it was. A SIGKILL during the
    renames leaves some files new and some old, each whole, and temporaries the next writer removes."""
    global _staged
    outer, _staged = _staged, {}
    staged = _staged
    try:
        yield
        _staged = outer
        for path, tmp in staged.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _staged = outer


def atomic_pair(path: str | Path, content: str | bytes | Callable[[Path], object], sidecar: str | Path,
                meta: dict, sidecar_first: bool, indent: int = 2) -> dict:
    """A data file and the JSON sidecar that describes it, each written atomically, the sidecar with the data's
    SHA-256 (data_sha256). Two renames cannot be one, so a SIGKILL between them leaves one file new and one old or
    gone; the order makes that state one the reader refuses, never a data file beside another output's sidecar:
    sidecar_first: the new sidecar replaces the old one, then the data: in between, the old data sits beside a
    sidecar whose data_sha256 is not its own (lg_dataset.load_sidecar checks it). Otherwise the old sidecar is
    removed first, then the data and the new sidecar renamed into place: in between, a data file has no sidecar
    (what generate.py's readers refuse). -> the sidecar as written."""
    path, sidecar = Path(path), Path(sidecar)
    remove_stale_temporaries(path.parent)
    remove_stale_temporaries(sidecar.parent)
    tmp, side_tmp = temporary_path(path), temporary_path(sidecar)
    try:
        _write_to(tmp, content)
        meta = {**meta, "data_sha256": sha256(tmp)}
        side_tmp.write_text(json.dumps(meta, indent=indent) + "\n", encoding="utf-8")
        if sidecar_first:
            os.replace(side_tmp, sidecar)
            os.replace(tmp, path)
        else:
            sidecar.unlink(missing_ok=True)
            os.replace(tmp, path)
            os.replace(side_tmp, sidecar)
    except BaseException:
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
        raise
    return meta


def atomic_json(path: str | Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def atomic_npy(path: str | Path, array) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:   # a file object: np.save would add .npy to the temporary file's name
            np.save(f, array)
    atomic_write(path, save)


def project_default(path: str, default: str) -> Path:
    """Defaults are relative to the project, so the command also works when started from another folder."""
    p = Path(path)
    if path == default and not p.exists() and (PROJECT_DIR / default).exists():
        return PROJECT_DIR / default
    return p


def check_writable(folder: str | Path, fix: str) -> None:
    """Refuse, before any computing, a folder the outputs could not be written to (read-only file system, no write
    permission; root passes permissions but not a read-only mount)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{folder}: not writable (read-only file system or no permission); {fix}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


GLIBC_MMAP_THRESHOLD_MAX = 32 << 20   # where glibc's own dynamic threshold ends up on 64-bit Linux


def cap_heap_growth(threshold: int = 4 << 20) -> bool:
    """Have glibc serve blocks >= threshold bytes with mmap, handed back to the system when freed (True if set).
    A double backward through oneDNN's LSTM (the reference's penalty) allocates and frees weight-sized blocks at
    every time step, and a critic step in chunks frees each chunk's graph before the next; on glibc's default heap
    both fragment and the RSS grows with the step count or the chunk count (README: Performance). The cap costs
    page faults, so the whole-batch lean penalty runs with glibc's usual 32 MB. MALLOC_MMAP_THRESHOLD_ in the
    environment wins."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(-3, threshold))   # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):                            # not glibc (e.g. musl): nothing to tune
        return False
