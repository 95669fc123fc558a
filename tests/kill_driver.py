"""Run a command and send its own process a real signal at a chosen point, as `kill -9`, a power cut or Ctrl-C
would at that moment (tests/test_reliability.py):

    python tests/kill_driver.py SIGNAL TARGET MATCH MODULE [ARGS...]

TARGET is a function as module.name (common._write_to, torch.save, os.replace, sampling.label, ...); right after a
call of it returns, SIGNAL (SIGKILL, SIGINT, SIGTERM) goes to this process, when the call's arguments, as text,
contain MATCH, or on the N-th call when MATCH is #N. MODULE then runs as `python MODULE.py ARGS...` would.
"""
import importlib
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

signame, target, match, module, *argv = sys.argv[1:]
owner_name, _, attr = target.rpartition(".")
owner = importlib.import_module(owner_name)
real = getattr(owner, attr)
calls = 0


def hooked(*args, **kwargs):
    global calls
    result = real(*args, **kwargs)
    calls += 1
    hit = calls == int(match[1:]) if match.startswith("#") else match in " ".join(map(str, args))
    if hit:
        os.kill(os.getpid(), getattr(signal, signame))
    return result


setattr(owner, attr, hooked)
sys.argv = [f"{module}.py", *argv]
runpy.run_module(module, run_name="__main__")
