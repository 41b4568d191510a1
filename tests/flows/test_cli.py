"""The CLI's error paths: a clear message, exit code 2, nothing changed."""

import pytest

from flows.cli import main

from testutil import tree_digest


def test_sql_refuses_a_write_with_exit_code_2(store, capsys):
    before = tree_digest(store.root)
    assert main(["sql", "--store", str(store.root), "DROP TABLE shards"]) == 2
    assert "read-only" in capsys.readouterr().err
    assert tree_digest(store.root) == before


def test_sql_formats(store, capsys):
    assert main(["sql", "--store", str(store.root), "--format", "csv", "SELECT count(*) AS n FROM prompts"]) == 0
    assert capsys.readouterr().out.splitlines() == ['"n"', "10"]
    assert main(["sql", "--store", str(store.root), "--format", "json", "SELECT count(*) AS n FROM prompts"]) == 0
    assert '"n": 10' in capsys.readouterr().out


def test_bad_prompt_file_names_line_and_field(store, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"messages": "not a list"}\n')
    assert main(["prompts", "add", "--store", str(store.root), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "'messages'" in err
    assert store.query("SELECT count(*) c FROM prompts").to_pylist() == [{"c": 10}]


def test_sql_on_a_folder_that_is_not_a_store(tmp_path, capsys):
    assert main(["sql", "--store", str(tmp_path / "nothing"), "SELECT 1"]) == 2
    assert "no catalog" in capsys.readouterr().err


def test_train_online_from_the_cli(untrained_model, prompt_file, tmp_path, capsys):
    out = tmp_path / "jbond"
    argv = ["train-online", "--policy", str(untrained_model), "--prompts", str(prompt_file), "--out", str(out),
            "--rm", "rewards_for_tests:letter_count", "--steps", "2", "--prompts-per-step", "4", "--max-new-tokens", "4"]
    assert main(argv) == 0
    assert '"steps": 2' in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "anchor" / "model.safetensors").is_file()
    assert len((tmp_path / "jbond-metrics.jsonl").read_text().splitlines()) == 2


def test_a_misspelt_store_is_an_error_and_creates_nothing(tmp_path, capsys):
    for argv in (["generate", "--store", str(tmp_path / "typo")], ["build", "--store", str(tmp_path / "typo"), "--n", "2"]):
        assert main(argv) == 2
        assert "no BOND store at" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("flags,message", [
    (["--rounds", "0"], "bond demo --rounds 0: the demo runs at least one round"),
    (["--n", "0"], "bond demo --n: field 'n': Input should be greater than or equal to 1 (got 0)"),
    (["--k", "0"], "bond demo --k: field 'k': Input should be greater than or equal to 1 (got 0)"),
    (["--k", "1"], "bond demo --n 2 --k 1: unbiased Best-of-2 weights need n <= k samples per prompt; raise --k to 2"),
])
def test_demo_refuses_flags_that_cannot_work_before_creating_a_store(flags, message, tmp_path, capsys):
    assert main(["demo", "--store", str(tmp_path / "demo"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "demo").exists()


def test_status_follows_a_round_stage_by_stage(store, capsys):
    import json

    from bond_data import build
    from testutil import run_generation, run_scoring

    def status():
        assert main(["status", "--store", str(store.root), "--format", "json"]) == 0
        return json.loads(capsys.readouterr().out)

    assert status()["next"] == "generate round 0"
    run_generation(store, k=3)
    s = status()
    assert s["prompts"] == 10 and s["next"] == "score round 0"
    assert s["per_round"][0] | {"scores": [], "datasets": []} == {
        "round": 0, "anchor": True, "candidate_shards": 3, "candidates": 30, "prompts": 10, "k_min": 3, "k_max": 3,
        "scores": [], "datasets": [], "trained": False}
    run_scoring(store)
    assert status()["next"] == "build round 0"
    build.build_dataset(store, 0, n=2)
    s = status()
    assert s["next"] == "train round 0" and s["per_round"][0]["scores"][0]["scored"] == 30
    assert s["per_round"][0]["datasets"][0]["weighting"] == "unbiased" and s["per_round"][0]["datasets"][0]["rows"] == 30
    assert main(["status", "--store", str(store.root)]) == 0 and "next: train round 0" in capsys.readouterr().out


def test_version(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("bond ")


def test_tables_are_not_truncated_off_a_terminal(store, capsys):
    assert main(["sql", "--store", str(store.root), "SELECT repeat('x', 300) AS wide, count(*) AS n FROM prompts"]) == 0
    assert "x" * 300 in capsys.readouterr().out


def test_bond_sql_gives_the_caller_its_signal_mask_back(store, capsys):
    import signal

    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    assert main(["sql", "--store", str(store.root), "SELECT 1 AS one"]) == 0
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


def test_our_warnings_print_as_one_warning_line_and_others_as_python_shows_them(capsys):
    import warnings

    from bond_data.errors import LogAMismatch
    from flows.cli import _warning_lines

    with pytest.warns(UserWarning, match="something else") as shown, _warning_lines():  # pytest: what Python shows
        warnings.warn("round 0: log A attended\n   otherwise", LogAMismatch)
        warnings.warn("something else", UserWarning)
    assert capsys.readouterr().err == "warning: round 0: log A attended otherwise\n"
    assert [w.category for w in shown] == [UserWarning]
