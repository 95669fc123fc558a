"""docs/flags.md is kept in step with train_lstm_gan.py -h: every flag of build_parser(), under its -h group, with
all its option strings and its default; presets are files whose values the parser takes as defaults."""
import json

import pytest

import arg_parser
from helpers import ROOT

DOC = (ROOT / "docs" / "flags.md").read_text()


def shown(default) -> str:
    """A default as the doc's second column writes it."""
    return "none" if default is None else "off" if default is False else str(default)


def doc_tables() -> dict[str, dict[tuple[str, ...], str]]:
    """{section title: {option strings: default cell}} of the doc's flag tables."""
    tables, title = {}, None
    for line in DOC.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            tables[title] = {}
        elif line.startswith("| `-") and title is not None:
            flags, default = (cell.strip() for cell in line.strip("|").split(" | ")[:2])
            tables[title][tuple(f.strip("`") for f in flags.split(", "))] = default.strip("`")
    return tables


def test_flags_doc_lists_every_flag_in_its_group_with_its_default():
    parser, tables = arg_parser.build_parser(), doc_tables()
    groups = [g for g in parser._action_groups if any(a.dest != "help" for a in g._group_actions)]
    assert [g.title for g in groups] == ["the paper's flags", "run control", "corrected variants", "extensions"]
    assert [t.lower() for t in tables] == [g.title for g in groups]
    for group, (title, rows) in zip(groups, tables.items()):
        actions = [a for a in group._group_actions if a.dest != "help"]
        assert list(rows) == [tuple(a.option_strings) for a in actions], title   # every flag, in -h's order
        for action in actions:
            assert rows[tuple(action.option_strings)] == shown(action.default), action.option_strings
    assert sum(map(len, tables.values())) == len([a for a in parser._actions if a.dest != "help"])


def test_help_shows_the_groups():
    text = arg_parser.build_parser().format_help()
    positions = [text.index(f"\n{title}:\n") for title in
                 ("the paper's flags", "run control", "corrected variants", "extensions")]
    assert positions == sorted(positions)


def test_presets_are_files_of_flag_values(tmp_path, monkeypatch, capsys):
    assert arg_parser.preset_names() == sorted({"paper", *(p.stem for p in (ROOT / "presets").glob("*.json"))})
    assert arg_parser.PRESETS["cpu"] == json.loads((ROOT / "presets" / "cpu.json").read_text())
    assert arg_parser.read_preset("paper") == {}
    # a preset of one's own: its values are the defaults, typed flags win; an unknown name is one line, exit 2
    (tmp_path / "small.json").write_text(json.dumps({"model_scale": 0.25, "batch_size": 8}))
    (tmp_path / "typo.json").write_text(json.dumps({"model-scale": 0.25}))
    (tmp_path / "broken.json").write_text("{")
    monkeypatch.setattr(arg_parser, "PRESET_DIR", tmp_path)
    args = arg_parser.parse_arg(["--preset", "small", "-b", "4"])
    assert (args.model_scale, args.batch_size, args.gan_epochs) == (0.25, 4, 20000)
    for name, problem in (("typo", "not flags of train_lstm_gan.py: model-scale"), ("broken", "not a readable")):
        with pytest.raises(SystemExit) as exc:
            arg_parser.parse_arg(["--preset", name])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and problem in err and err.count("\n") == 1
