"""Execute a run's result notebook headless and save an HTML copy next to it.

    python run_notebook.py results/<unix time>_lstm_gan     # prints the path of result.html

The trainer copies visualize_lstm_gan.ipynb into every run folder as result.ipynb and calls
execute_notebook() for its --execute-notebook flag.
"""
import os
import re
import sys
import warnings
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError
from nbconvert import HTMLExporter

from common import OneLineParser, UserError, atomic_write, cli

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookError(UserError):
    """The notebook could not be executed; the message is a single line."""


def one_line(text: object) -> str:
    # tracebacks from the kernel carry colour codes and newlines; errors here must fit on one line
    return " ".join(ANSI.sub("", str(text)).split())


def failed_cell(nb: nbformat.NotebookNode) -> tuple[int | None, dict | None]:
    """Index (in nb.cells) and error output of the first cell that raised."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return i, out
    return None, None


def execute_notebook(result_dir: str | Path, notebook: str = "result.ipynb", timeout: int = 600) -> Path:
    """Run result_dir/notebook with result_dir as cwd, save it in place, write its HTML copy; return the HTML path."""
    result_dir = Path(result_dir)
    nb_path = result_dir / notebook
    if not result_dir.is_dir():
        raise NotebookError(f"no such run folder: {result_dir}; pass a folder under results/")
    if not nb_path.is_file():
        raise NotebookError(f"no notebook {notebook} in {result_dir}; pass --notebook")
    try:
        with warnings.catch_warnings():  # hand-written notebooks without cell ids warn; harmless here
            warnings.simplefilter("ignore")
            nb = nbformat.read(nb_path, as_version=4)
    except Exception as e:
        raise NotebookError(f"{nb_path}: unreadable notebook: {one_line(e)}") from e

    # Agg needs no display; the notebook emits its figures as PNG itself, so the inline backend is not needed
    env = {**os.environ, "MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    # log_level=ERROR: keeps the kernel's start-up warnings (plain-TCP transport) out of the trainer's output
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    error, cause = None, None
    try:
        client.execute(cwd=str(result_dir.resolve()), env=env)
    except CellExecutionError as e:
        i, out = failed_cell(nb)
        where = f"cell {i}" if i is not None else "a cell"
        what = f"{out['ename']}: {out['evalue']}" if out else f"{e.ename}: {e.evalue}"
        error, cause = NotebookError(f"{nb_path}: {where} failed: {one_line(what)}"), e
    except CellTimeoutError as e:
        error, cause = NotebookError(f"{nb_path}: a cell ran past the {timeout} s timeout"), e
    except Exception as e:  # dead kernel, missing kernelspec, kernel start timeout
        error, cause = NotebookError(f"{nb_path}: {type(e).__name__}: {one_line(e)}"), e

    # save even a failed run: the error output shows where it stopped when the notebook is opened
    atomic_write(nb_path, nbformat.writes(nb))
    if error is not None:
        raise error from cause
    html, _ = HTMLExporter().from_notebook_node(nb)
    html_path = nb_path.with_suffix(".html")
    atomic_write(html_path, html)
    return html_path


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="run_notebook.py",
                           description="Execute a run folder's result notebook and write result.html.")
    parser.add_argument("result_dir", help="results/<unix time>_lstm_gan")
    parser.add_argument("--notebook", default="result.ipynb", help="notebook file inside the run folder")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    def run() -> None:
        try:
            print(execute_notebook(args.result_dir, args.notebook, args.timeout))
        except OSError as err:   # e.g. a read-only run folder
            raise NotebookError(one_line(err)) from None
    return cli(run)


if __name__ == "__main__":
    sys.exit(main())
