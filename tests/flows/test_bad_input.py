"""Every bad input: one `error:` line (naming file, line and field where there is one), exit code 2,
no traceback, and the store byte-for-byte unchanged (nothing written, nothing registered).

Each case runs the real command line in process (`flows.cli.main`); none of them gets as far as
starting Prefect, which is the point: what can be checked is checked first.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from flows.cli import main

from testutil import run_generation, tree_digest, write_jsonl


def _file(name: str, content: str | bytes):
    """A setup that writes `content` to tmp/name and returns its path."""
    def make(tmp: Path, store) -> str:
        path = tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)
    return make


def _fifo(tmp: Path, store) -> str:
    os.mkfifo(tmp / "p.jsonl")
    return str(tmp / "p.jsonl")


def _dev_zero(tmp: Path, store) -> str:
    (tmp / "z.jsonl").symlink_to("/dev/zero")
    return str(tmp / "z.jsonl")


def _not_a_dataset(tmp: Path, store) -> str:
    (tmp / "folder").mkdir()
    (tmp / "folder" / "x.txt").write_text("x")
    return str(tmp / "folder")


def _not_a_model(tmp: Path, store) -> str:
    (tmp / "rm").mkdir()
    (tmp / "rm" / "config.json").write_text("{}")
    return str(tmp / "rm")


def _empty_folder(tmp: Path, store) -> str:
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def _a_file(tmp: Path, store) -> str:
    (tmp / "plain").write_text("x")
    return str(tmp / "plain")


DEEP = "[" * 100_000 + "]" * 100_000
PROMPTS = [  # (case, file setup, message)
    ("missing file", lambda t, s: str(t / "missing.jsonl"), "no such file"),
    ("folder not saved by datasets", _not_a_dataset, "not a folder saved with datasets"),
    ("a FIFO", _fifo, "not a regular file"),
    ("a symlink to /dev/zero", _dev_zero, "not a regular file"),
    ("JSON nested 100k deep", _file("p.jsonl", DEEP + "\n"), "p.jsonl:1: JSON nested deeper"),
    ("not UTF-8", _file("p.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'), "p.jsonl:2: not UTF-8"),
    ("a lone surrogate escape", _file("p.jsonl", '{"prompt": "x \\ud800 y"}\n'), "p.jsonl:1: field 'prompt' holds an invalid Unicode"),
    ("UTF-16", _file("p.jsonl", '{"prompt": "x"}\n'.encode("utf-16")), "UTF-16"),
    ("gzip named .jsonl", _file("p.jsonl", gzip.compress(b'{"prompt": "x"}\n')), "gzip"),
    ("a 5000-digit integer", _file("p.jsonl", '{"prompt": ' + "9" * 5000 + "}\n"), "p.jsonl:1: invalid JSON"),
    ("chat ending with an assistant turn", _file("p.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"),
     "p.jsonl:1: field 'messages[1]'"),
    ("invalid JSON", _file("p.jsonl", '{"prompt": "a"}\n{"prompt": \n'), "p.jsonl:2: invalid JSON"),
    ("a JSON array", _file("p.jsonl", "[1, 2]\n"), "p.jsonl:1: expected an object"),
    ("prompt and messages", _file("p.jsonl", '{"prompt": "a", "messages": []}\n'), "p.jsonl:1: exactly one"),
    ("an empty prompt", _file("p.jsonl", '{"prompt": "  "}\n'), "p.jsonl:1: field 'prompt'"),
    ("an unknown role", _file("p.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n'), "field 'messages[0]'"),
    ("a number as prompt", _file("p.jsonl", '{"prompt": 3}\n'), "field 'prompt' must be a non-empty string"),
    ("a .csv", _file("p.csv", "prompt\nx\n"), "unsupported input"),
    ("an empty file", _file("p.jsonl", "\n\n"), "no prompts found"),
    ("garbage .parquet", _file("p.parquet", b"PAR1 not really"), "not a readable Parquet file"),
    ("a line of 2 MB", _file("p.jsonl", '{"prompt": "' + "x" * (2 << 20) + '"}\n'), "p.jsonl:1: line longer than"),
]

CONFIGS = [  # (case, command, config file content or None, extra flags, message)
    ("missing --config", "generate", None, ["--config", "{tmp}/nope.yaml"], "nope.yaml: no such config file"),
    ("YAML syntax error", "generate", "k: 4\nbatch_size: [1, 2\n", [], "c.yaml:3:1: YAML syntax error"),
    ("YAML not a mapping", "generate", "- k\n- 4\n", [], "expected a mapping"),
    ("a misspelt key", "generate", "kk: 4\n", [], "field 'kk': unknown key"),
    ("a boolean where an int goes", "generate", "k: true\n", [], "field 'k': Input should be a valid integer"),
    ("a config that is a folder", "generate", None, ["--config", "{tmp}"], "not a regular file"),
    ("device: tpu", "generate", "device: tpu\n", [], "field 'device'"),
    ("k out of range", "generate", None, ["--k", "0"], "field 'k': Input should be greater than or equal to 1"),
    ("temperature 0", "generate", None, ["--temperature", "0"], "field 'temperature'"),
    ("beta above 1", "train", "beta: 2\n", [], "field 'beta'"),
    ("a LoRA spec without targets", "train", None, ["--lora", "r=16,alpha=32"], "field 'lora'"),
    ("static-compiled decoding on a CPU", "generate", None, ["--decoding", "static-compiled", "--device", "cpu"],
     "field 'decoding': Value error, static-compiled needs a CUDA device"),
    ("a misspelt rounds section", "rounds", "generat:\n  k: 4\n", ["--num", "1"], "unknown section(s) ['generat']"),
    ("a rounds section not a mapping", "rounds", "generate: 4\n", ["--num", "1"], "section 'generate' must be a mapping"),
    ("a misspelt key in a rounds section", "rounds", "build:\n  nn: 2\n", ["--num", "1"], "[build]: field 'nn': unknown key"),
    ("a missing held-out prompts file", "rounds", "evaluate:\n  prompts: no/such/held_out.jsonl\n", ["--num", "1"],
     "[evaluate]: field 'prompts': no such file"),
    ("rounds whose n exceeds k", "rounds", "generate:\n  k: 4\nbuild:\n  n: 8\n", ["--num", "1"],
     "[build] n = 8 > [generate] k = 4: unbiased Best-of-8 weights need n <= k"),
    ("rounds whose flags set n above k", "rounds", None, ["--num", "1", "--n", "9", "--k", "4"], "[build] n = 9 > [generate] k = 4"),
    ("a negative number of rounds", "rounds", None, ["--num", "-1"], "--num -1: the number of rounds in all cannot be negative"),
]

REWARDS = [  # (case, --rm, extra flags, message)
    ("a module that does not import", "no_such_module:f", [], "cannot import module"),
    ("no such function", "rewards_for_tests:nope", [], "has no callable 'nope'"),
    ("a reward model that raises", "rewards_for_tests:raises", [], "raised ZeroDivisionError"),
    ("one that returns None", "rewards_for_tests:returns_none", [], "returned NoneType"),
    ("one that returns a scalar", "rewards_for_tests:returns_scalar", [], "returned float"),
    ("the wrong number of values", "rewards_for_tests:one_too_few", [], "rewards for a batch of"),
    ("strings", "rewards_for_tests:strings", [], "rewards must be real numbers"),
    ("booleans", "rewards_for_tests:booleans", [], "rewards must be real numbers"),
    ("NaN", "rewards_for_tests:nan_on_third", ["--batch-size", "8"], "returned nan for candidate"),
    ("a bad --rm-id", "rewards_for_tests:letter_count", ["--rm-id", "../x"], "use letters, digits"),
    ("device: tpu", "rewards_for_tests:letter_count", ["--device", "tpu"], "field 'device'"),
]

STORES = [  # (case, argv with {store} / {tmp} / {path}, setup for {path}, message)
    ("generate on a store that does not exist", ["generate", "--store", "{tmp}/nothing"], None, "no BOND store at"),
    ("a store path that is a file", ["prompts", "add", "--store", "{path}", "{tmp}/p.jsonl"], _a_file, "is a file, not a store folder"),
    ("a store under a file", ["prompts", "add", "--store", "{path}/sub", "{tmp}/p.jsonl"], _a_file, "cannot create the store folder"),
    ("a round with no anchor", ["generate", "--store", "{store}", "--round", "3"], None, "round 3 has no registered anchor"),
    ("build of an unscored round", ["build", "--store", "{store}", "--n", "2"], None, "round 0 has no scores yet"),
    ("score of a round with no candidates", ["score", "--store", "{store}", "--round", "5"], None, "round 5 has no candidates"),
    ("train without a dataset", ["train", "--store", "{store}"], None, "round 0 has no dataset"),
    ("an anchor folder with no files", ["init", "--store", "{store}", "--round", "4", "--anchor", "{path}"], _empty_folder,
     "empty or missing checkpoint"),
    ("a reward-model folder that is not a model", ["score", "--store", "{store}", "--rm", "{path}"], _not_a_model, "cannot load"),
    ("rounds without an anchor", ["rounds", "--store", "{tmp}/fresh", "--num", "1"], None, "no BOND store at"),
    ("more candidates for a round at another temperature", ["generate", "--store", "{store}", "--k", "6",
                                                             "--temperature", "0.7"], None, "temperature 0.7 (the round's: 1.0)"),
    ("more candidates for a round under another precision", ["generate", "--store", "{store}", "--k", "6",
                                                              "--precision", "bf16-autocast"], None,
     "precision 'bf16-autocast' (the round's: 'fp32')"),
]

FLAGS = [  # (case, argv with {store} / {tmp}, message): what argparse refuses, as one line too
    ("an unknown command", ["frobnicate"], "bond: argument command: invalid choice: 'frobnicate'"),
    ("an invalid choice", ["generate", "--store", "{store}", "--precision", "bf32"],
     "bond generate: argument --precision: invalid choice: 'bf32'"),
    ("a word for a number", ["generate", "--store", "{store}", "--k", "x"], "argument --k: invalid int value: 'x'"),
    ("a missing argument", ["prompts", "add"], "bond prompts add: the following arguments are required: --store, file"),
    ("an unknown flag", ["generate", "--store", "{store}", "--kk", "3"], "bond generate: unrecognized arguments: --kk 3"),
    ("an unknown flag of a nested command", ["prompts", "add", "--store", "{store}", "{tmp}/p.jsonl", "--foo"],
     "bond prompts add: unrecognized arguments: --foo; see `bond prompts add --help`"),
    ("a boolean that is neither", ["train", "--store", "{store}", "--fsdp", "maybe"], "argument --fsdp"),
]

TRAINER = [  # (case, argv of `python -m trainer.train`, the torchrun entry point, message)
    ("a config value out of range", ["--store", "{store}", "--lr", "-1"], "flags: field 'lr': Input should be greater than 0"),
    ("a store that does not exist", ["--store", "{tmp}/nothing"], "no BOND store at"),
    ("a round without a dataset", ["--store", "{store}"], "round 0 has no dataset"),
    ("an unknown flag", ["--store", "{store}", "--kk", "3"], "python -m trainer.train: unrecognized arguments: --kk 3"),
]

SQL = [
    ("a write", "DELETE FROM shards", "read-only"),
    ("EXPLAIN ANALYZE of a COPY", "EXPLAIN ANALYZE COPY (SELECT 1) TO '{store}/candidates/x.parquet' (FORMAT parquet)", "read-only"),
    ("a file outside the store", "SELECT * FROM read_text('/etc/passwd')", "Permission"),
    ("a glob outside the store", "SELECT * FROM glob('/etc/*')", "Permission"),
    ("a syntax error", "SELEC 1", "does not parse"),
    ("no statement", "  ", "no SQL statement"),
    ("an unknown table", "SELECT * FROM nope", "SQL error"),
    ("a write after a read", "SELECT 1; DROP TABLE shards", "read-only"),
]


@pytest.fixture
def scored_store(store):
    run_generation(store, k=2)  # candidates of round 0, no scores
    return store


def _run(argv: list[str], store, capsys, entry=main) -> str:
    before = tree_digest(store.root)
    try:
        code = entry(argv)
    except SystemExit as e:  # argparse's own exit, after its one line
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "usage:" not in err
    assert tree_digest(store.root) == before  # byte for byte: nothing written, nothing registered
    return lines[0]


@pytest.mark.parametrize("case, setup, message", PROMPTS, ids=[c[0] for c in PROMPTS])
def test_bad_prompt_files(case, setup, message, store, tmp_path, capsys):
    path = setup(tmp_path, store)
    assert message in _run(["prompts", "add", "--store", str(store.root), path], store, capsys)


@pytest.mark.parametrize("case, command, content, flags, message", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_configs(case, command, content, flags, message, scored_store, tmp_path, capsys):
    argv = [command, "--store", str(scored_store.root)]
    if content is not None:
        (tmp_path / "c.yaml").write_text(content)
        argv += ["--config", str(tmp_path / "c.yaml")]
    argv += [f.format(tmp=tmp_path) for f in flags]
    assert message in _run(argv, scored_store, capsys)


@pytest.mark.parametrize("case, rm, flags, message", REWARDS, ids=[c[0] for c in REWARDS])
def test_bad_reward_models(case, rm, flags, message, scored_store, capsys):
    line = _run(["score", "--store", str(scored_store.root), "--rm", rm, *flags], scored_store, capsys)
    assert message in line
    assert scored_store.query("SELECT count(*) AS n FROM reward_models").to_pylist() == [{"n": 0}]


@pytest.mark.parametrize("case, argv, setup, message", STORES, ids=[c[0] for c in STORES])
def test_bad_store_paths_and_stages(case, argv, setup, message, scored_store, tmp_path, capsys):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "sort: ab ="}])
    path = setup(tmp_path, scored_store) if setup else ""
    argv = [a.format(store=scored_store.root, tmp=tmp_path, path=path) for a in argv]
    assert message in _run(argv, scored_store, capsys)
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("case, argv, message", FLAGS, ids=[c[0] for c in FLAGS])
def test_bad_command_lines(case, argv, message, scored_store, tmp_path, capsys):
    line = _run([a.format(store=scored_store.root, tmp=tmp_path) for a in argv], scored_store, capsys)
    assert message in line and line.endswith(" --help`"), line  # where to read more


def test_bond_alone_prints_its_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: bond") and "generate" in out and "sample k candidates" in out


@pytest.mark.parametrize("case, argv, message", TRAINER, ids=[c[0] for c in TRAINER])
def test_bad_input_to_the_torchrun_entry_point(case, argv, message, scored_store, tmp_path, capsys):
    from trainer.train import main as train_main

    line = _run([a.format(store=scored_store.root, tmp=tmp_path) for a in argv], scored_store, capsys, train_main)
    assert message in line
    assert not (tmp_path / "nothing").exists()  # a misspelt --store creates nothing


@pytest.mark.parametrize("case, sql, message", SQL, ids=[c[0] for c in SQL])
def test_bad_sql(case, sql, message, scored_store, capsys):
    line = _run(["sql", "--store", str(scored_store.root), sql.format(store=scored_store.root)], scored_store, capsys)
    assert message in line


def test_the_corpus_covers_at_least_40_kinds():
    assert len(PROMPTS) + len(CONFIGS) + len(REWARDS) + len(STORES) + len(FLAGS) + len(TRAINER) + len(SQL) >= 50


def test_a_utf8_bom_is_accepted(store, tmp_path, capsys):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "sort: ba ="}\n')
    assert main(["prompts", "add", "--store", str(store.root), str(path)]) == 0
    assert "added 1" in capsys.readouterr().out


def test_a_failed_scoring_registers_no_reward_model_and_a_fixed_one_runs(scored_store, capsys):
    """A reward model that fails is not registered: the fixed one (another hash) is accepted next."""
    from testutil import run_scoring

    assert main(["score", "--store", str(scored_store.root), "--rm", "rewards_for_tests:one_too_few",
                 "--rm-id", "myrm"]) == 2
    capsys.readouterr()
    assert run_scoring(scored_store, "rewards_for_tests:letter_count", rm_id="myrm") == "myrm"
