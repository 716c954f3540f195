"""What a user sees when they can fix the problem (one `error:` line, exit 2) and when it is a bug
(Hydra's traceback), through run.py as typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from common.errors import USER_ERROR_EXIT_CODE

pytestmark = pytest.mark.slow


def error_line(done) -> str:
    """The run's one error line; there must be no traceback around it."""
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def jsonl_run(tmp_path: Path, path: Path, *extra: str) -> list[str]:
    return [
        "stages=[prepare]",
        "debug=tiny",
        "data=jsonl",
        f"data.sources=[{{path: '{path}', domain: book}}]",
        "data.window_size=32",
        f"paths.root_dir={tmp_path}",
        *extra,
    ]


def test_bad_input_is_one_line_naming_the_file_and_line(tmp_path):
    corpus = tmp_path / "books.jsonl"
    corpus.write_text(json.dumps({"text": "fine " * 50}) + "\n{oops\n")
    done = run_cli(*jsonl_run(tmp_path, corpus), returncode=USER_ERROR_EXIT_CODE)
    assert error_line(done).startswith(f"error: {corpus}:2: malformed JSON")
    assert "data.on_bad_record=skip" in error_line(done)

    missing = run_cli(*jsonl_run(tmp_path, tmp_path / "nope.jsonl"), returncode=USER_ERROR_EXIT_CODE)
    assert f"data.sources[*].path={tmp_path / 'nope.jsonl'}: matches no file" in error_line(missing)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("selection.fraction=2", "selection.fraction=2"),
        ("selection.scoring.impl=foo", "selection.scoring.impl=foo"),
    ],
)
def test_bad_config_values_are_one_line_naming_the_key(tmp_path, override, message):
    done = run_cli(
        "stages=[prepare,score,select]",
        "debug=tiny",
        override,
        f"paths.root_dir={tmp_path}",
        returncode=USER_ERROR_EXIT_CODE,
    )
    assert error_line(done).startswith(f"error: {message}")
    assert not (tmp_path / "artifacts").exists()  # checked before prepare ran, not after scoring


def test_hydra_full_error_shows_the_traceback_of_a_user_error(tmp_path):
    done = run_cli(
        *jsonl_run(tmp_path, tmp_path / "nope.jsonl"),
        env={"HYDRA_FULL_ERROR": "1"},
        returncode=1,
    )
    assert "Traceback" in done.stderr
    assert "CorpusError: data.sources[*].path=" in done.stderr


def test_a_program_bug_keeps_its_traceback(tmp_path):
    # sitecustomize runs before run.py: it turns the window cutter into a bug
    fake = tmp_path / "bug"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import selection.windows\n"
        "def broken(*args, **kwargs):\n"
        "    raise ZeroDivisionError('a bug, not the user')\n"
        "selection.windows.window_starts = broken\n"
    )
    corpus = tmp_path / "books.jsonl"
    corpus.write_text(json.dumps({"text": "fine " * 50}) + "\n")
    repo = Path(__file__).resolve().parent.parent
    done = run_cli(*jsonl_run(tmp_path, corpus), env={"PYTHONPATH": f"{fake}:{repo}"}, returncode=1)
    assert "ZeroDivisionError: a bug, not the user" in done.stderr
    assert "Traceback" in done.stderr or "Set the environment variable HYDRA_FULL_ERROR=1" in done.stderr
    assert not [line for line in done.stderr.splitlines() if line.startswith("error: ")]
