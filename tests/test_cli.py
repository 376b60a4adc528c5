"""The `ragpt` command line (typer's CliRunner on ragpt.cli.main.app)."""

from __future__ import annotations

import json

import pytest
from conftest import write
from typer.testing import CliRunner

from ragpt.cli.main import app

runner = CliRunner()

SUBCOMMANDS = {
    ("ingest",): "Add or update documents",
    ("ask",): "answer",
    ("retrieve",): "chunks",
    ("demo",): "sample corpus",
    ("index",): "List, inspect and delete indexes",
    ("index", "info"): "manifest",
    ("index", "list"): "List the indexes",
    ("models",): "generator and embedder",
    ("models", "prepare"): "Load both models",
    ("train",): "soft prompt",
    ("eval",): "Evaluate methods",
    ("import-data",): "shared public QA set",
    ("prompts",): "Soft-prompt registry",
    ("serve",): "chat endpoints",
}


@pytest.fixture(autouse=True)
def no_ambient_config(monkeypatch, tmp_path):
    """Run each command from an empty folder with no RAGPT_* settings except the model cache."""
    import os

    for key in list(os.environ):
        if key.startswith("RAGPT_") and key != "RAGPT_CACHE_DIR":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_help_describes_the_tool_and_lists_subcommands():
    res = _run("--help")
    assert res.exit_code == 0, res.output
    assert "retrieval-augmented generation" in res.output
    for cmd in ("ingest", "ask", "retrieve", "demo", "index", "models"):
        assert cmd in res.output


@pytest.mark.parametrize("cmd", list(SUBCOMMANDS), ids=" ".join)
def test_each_subcommand_help_states_its_purpose(cmd):
    res = _run(*cmd, "--help")
    assert res.exit_code == 0, res.output
    assert SUBCOMMANDS[cmd].lower() in " ".join(res.output.split()).lower()


def test_no_arguments_shows_help_without_failing_silently():
    res = _run()
    assert "Usage" in res.output
    assert "ingest" in res.output


def test_ask_on_a_missing_index_fails_with_a_clear_error(tmp_path):
    res = _run("--index-dir", str(tmp_path / "idx"), "ask", "How many days?", "-d", "hr", "-i", "nosuch")
    assert res.exit_code == 2
    assert "error:" in res.output and "nosuch" in res.output
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize(
    "cmd",
    [
        ["ask", "How many days?", "-d", "hr"],
        ["retrieve", "How many days?", "-d", "hr"],
        ["ingest", "-q", "-i", "t", "-d", "hr", "docs"],
        ["index", "info", "t"],
        ["index", "list"],
        ["models", "prepare"],
    ],
    ids=" ".join,
)
def test_invalid_setting_fails_every_command_with_a_clear_error(tmp_path, cmd):
    res = _run("--index-dir", str(tmp_path / "idx"), "--bf16", "sometimes", *cmd)
    assert res.exit_code == 2, f"exit {res.exit_code}, exception {res.exception!r}"
    assert "error:" in res.output and "bf16" in res.output
    assert not (tmp_path / "idx").exists()


def test_index_list_on_an_empty_folder_prints_nothing(tmp_path):
    res = _run("--index-dir", str(tmp_path / "idx"), "index", "list")
    assert res.exit_code == 0, res.output
    assert res.output.strip() == ""


@pytest.mark.integration
def test_ingest_of_a_missing_path_exits_2_and_writes_nothing(tmp_path):
    idx = tmp_path / "idx"
    missing = tmp_path / "no-such-folder"
    res = _run("--index-dir", str(idx), "ingest", "-q", "-i", "t", "-d", "hr", str(missing))
    assert res.exit_code == 2
    assert "error:" in res.output
    assert str(missing) in res.output
    assert not idx.exists()


@pytest.mark.integration
def test_ingest_then_ask_json_and_retrieve(tmp_path):
    idx = tmp_path / "idx"
    docs = tmp_path / "docs"
    write(docs / "vacation.md", "# Vacation Policy\n\nEmployees receive 28 vacation days per year. "
                                "Requests go through the HolidayDesk portal.\n")
    write(docs / "sick.txt", "Sick Leave\nReport sick leave to your manager before 9:00 on the first day.\n")
    write(tmp_path / "other" / "vpn.md", "# VPN\n\nInstall the VPN client before working from home.\n")

    res = _run("--index-dir", str(idx), "ingest", "-q", "-i", "t", "-d", "hr", str(docs))
    assert res.exit_code == 0, res.output
    assert "2 added" in res.output
    res = _run("--index-dir", str(idx), "ingest", "-q", "-i", "t", "-d", "it", str(tmp_path / "other"))
    assert res.exit_code == 0, res.output
    again = _run("--index-dir", str(idx), "ingest", "-q", "-i", "t", "-d", "hr", str(docs))
    assert again.exit_code == 0 and "2 unchanged" in again.output

    listed = _run("--index-dir", str(idx), "index", "list")
    assert listed.output.split() == ["t"]
    info = json.loads(_run("--index-dir", str(idx), "index", "info", "t").output)
    assert info["departments"].keys() == {"hr", "it"}
    assert len(info["documents"]) == 3

    res = _run("--index-dir", str(idx), "ask", "How many vacation days do employees get?",
               "-d", "hr", "-i", "t", "-k", "2", "--max-tokens", "12", "--json")
    assert res.exit_code == 0, res.output
    answer = json.loads(res.stdout.strip().splitlines()[-1])
    assert answer["text"].strip()
    assert answer["department"] == "hr"
    assert len(answer["citations"]) == 2
    assert {c["source"].rsplit("/", 1)[-1] for c in answer["citations"]} == {"vacation.md", "sick.txt"}
    assert answer["citations"][0]["source"].endswith("vacation.md")
    assert 0 < answer["usage"]["completion_tokens"] <= 12

    res = _run("--index-dir", str(idx), "retrieve", "How do I connect from home?", "-d", "it", "-i", "t")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("[1] ") and "vpn.md" in lines[0]
    assert "VPN client" in lines[1]
    assert "vacation" not in res.output.lower()  # hr's documents are not it's

    res = _run("--index-dir", str(idx), "retrieve", "vacation days", "-d", "hr", "-i", "t", "--no-dense", "-k", "2")
    assert res.exit_code == 0, res.output
    ranked = [x for x in res.output.splitlines() if x.startswith("[")]
    assert ranked[0].startswith("[1] ") and "vacation.md" in ranked[0] and "dense=None" in ranked[0]

    res = _run("--index-dir", str(idx), "retrieve", "vacation", "-d", "legal", "-i", "t")
    assert res.exit_code == 2 and "error:" in res.output and "legal" in res.output

    gone = _run("--index-dir", str(idx), "ingest", "-i", "t", "--delete", str(docs / "sick.txt"))
    assert gone.exit_code == 0, gone.output
    info = json.loads(_run("--index-dir", str(idx), "index", "info", "t").output)
    assert len(info["documents"]) == 2


def test_train_refuses_a_negative_depth_naming_it(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "q?", "answers": ["a"]}\n')
    res = _run("--index-dir", str(tmp_path / "idx"), "train", "-d", "hr", "--data", str(tmp_path / "qa.jsonl"),
               "--depth", "-1")
    assert res.exit_code == 2
    assert "Invalid value for '--depth'" in res.output and "greater than or equal to 0" in res.output
    assert not (tmp_path / "idx").exists()


def test_train_settings_are_checked_before_anything_is_loaded(tmp_path):
    """A bad setting that typer cannot see (grad_accum vs batch size) fails before the index opens."""
    (tmp_path / "qa.jsonl").write_text('{"question": "q?", "answers": ["a"]}\n')
    res = _run("--index-dir", str(tmp_path / "idx"), "train", "-d", "hr", "--data", str(tmp_path / "qa.jsonl"),
               "-i", "nosuch", "--batch-size", "8", "--grad-accum", "3")
    assert res.exit_code == 2 and "grad_accum" in res.output and "nosuch" not in res.output
