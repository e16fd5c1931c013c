"""Atomic writes keep the permissions a plain write would give; output folders are checked at parse time."""

import argparse
import os
import stat

import pytest

from lpl.utils.cli_args import output_dir
from lpl.utils.io import atomic_write_json


def test_new_files_get_the_umask_mode_and_rewrites_keep_the_files_mode(tmp_path):
    mask = os.umask(0o027)  # as a user's shell might set it
    try:
        atomic_write_json(tmp_path / "new.json", {"a": 1})
    finally:
        os.umask(mask)
    # as open() would create it under the process's umask (mkstemp alone made it 0600: unreadable to others)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640
    (tmp_path / "shared.json").write_text("{}")
    os.chmod(tmp_path / "shared.json", 0o644)
    atomic_write_json(tmp_path / "shared.json", {"b": 2})
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644
    os.chmod(tmp_path / "shared.json", 0o600)
    atomic_write_json(tmp_path / "shared.json", {"b": 3})
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o600


def test_output_dir_refuses_a_file_in_the_way_and_accepts_new_nested_folders(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        output_dir(str(tmp_path / "taken" / "out"))
    assert output_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"


def test_the_commands_parser_takes_both_spellings_and_no_prefix():
    from lpl.utils.cli_args import Parser

    parser = Parser(prog="x")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("-c", "--check_orders", type=int, default=1)
    assert parser.parse_args(["--batch_size", "8", "-c", "3"]) == parser.parse_args(["--batch-size", "8",
                                                                                      "--check-orders", "3"])
    assert parser.parse_args([]).check_orders == 1
    with pytest.raises(SystemExit):  # a prefix would match both spellings: refused, not guessed
        parser.parse_args(["--batch", "8"])
