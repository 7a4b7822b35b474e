"""The trainer's output_dir check, run inside fail_together before anything writes there."""

import os

import pytest

from megakto.errors import ConfigError
from megakto.startup import check_output_dir as _check_output_dir


def test_missing_folder_is_made(tmp_path):
    _check_output_dir(str(tmp_path / "a" / "b"))
    assert os.path.isdir(tmp_path / "a" / "b")
    assert os.listdir(tmp_path / "a" / "b") == []  # the write test leaves nothing behind


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=rf"^output_dir={tmp_path / 'f'} is a file, not a folder"):
        _check_output_dir(str(tmp_path / "f"))


def test_a_path_below_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=rf"^output_dir={tmp_path / 'f' / 'out'}: cannot write there \(Not a directory\)"):
        _check_output_dir(str(tmp_path / "f" / "out"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=r"cannot write there \(Permission denied\)"):
            _check_output_dir(str(ro))
    finally:
        ro.chmod(0o700)
