"""`argen train unclip`'s side-by-side runner: each job in its own process and log, a failure named with its log."""

import pytest

from argen.tasks.unclip_stack import run_side_by_side


def test_side_by_side_jobs_write_their_own_logs(tmp_path):
    seconds = run_side_by_side({"a": (print, ("hello from a",)), "b": (print, ("hello from b",))}, tmp_path,
                               threads=2, poll_seconds=0.1)
    assert set(seconds) == {"a", "b"} and all(s > 0 for s in seconds.values())
    assert (tmp_path / "a.log").read_text() == "hello from a\n"
    assert (tmp_path / "b.log").read_text() == "hello from b\n"


def test_a_failed_side_by_side_job_is_named_with_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"stage\(s\) bad failed(.|\n)*bad\.log \(exit code 1\)(.|\n)*invalid literal"):
        run_side_by_side({"ok": (print, ("fine",)), "bad": (int, ("not a number",))}, tmp_path, threads=2)
    assert (tmp_path / "ok.log").read_text() == "fine\n"  # the other job ran to its end
