"""The modules at the repository root import one way: no cycle (function-local imports count), the paper's step
and networks without this project's extensions, the estimator, the data and the sampling below the trainer; and
the trainer stays readable (GANTrainerBase under 200 lines, gan_trainer_base.py at most 450)."""
import ast

from helpers import ROOT

MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imports(name: str) -> set[str]:
    """The repository modules that a module imports anywhere in it (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def reachable(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for m in GRAPH[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_no_import_cycle_among_the_top_level_modules():
    cycles = sorted(name for name in GRAPH if name in reachable(name))
    assert not cycles, f"modules on an import cycle: {cycles} ({ {n: sorted(GRAPH[n]) for n in cycles} })"


def test_imports_flow_one_way():
    assert {"models", "wgan_gp", "gan_trainer_base", "train_lstm_gan"}.isdisjoint(reachable("extensions"))
    # the paper's step reads without the extensions: their terms come in as WGANGP(extra_terms=...); the networks
    # take the residual channel's and the temperature head's functions from extensions.py
    assert "extensions" not in GRAPH["wgan_gp"]
    assert GRAPH["extensions"] == set() and GRAPH["runtime"] == set()   # torch only
    trainer = {"gan_trainer_base", "train_lstm_gan", "generate", "evaluate", "bench"}
    for below in ("models", "wgan_gp", "runtime", "sampling", "soc_estimator", "lg_dataset", "metrics", "run_dir"):
        assert trainer.isdisjoint(reachable(below)), below
    # the command lines sample through sampling.py, not through one another (bench.py times the trainer's step
    # and builds its optimizers as train_lstm_gan.py does)
    for command in ("generate", "evaluate", "bench"):
        assert {"generate", "evaluate", "bench"}.isdisjoint(reachable(command)), command
    assert {"gan_trainer_base", "train_lstm_gan"}.isdisjoint(reachable("generate") | reachable("evaluate"))


def test_the_trainer_stays_readable():
    source = MODULES["gan_trainer_base"].read_text()
    tree = ast.parse(source)
    [trainer] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GANTrainerBase"]
    assert trainer.end_lineno - trainer.lineno + 1 < 200
    assert len(source.splitlines()) <= 450
