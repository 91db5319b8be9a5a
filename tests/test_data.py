"""The GSM8K JSONL reader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.data import GSM8K_ENV, load_gsm8k


def write(tmp_path: Path, lines: list[str]) -> Path:
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_reads_items_in_order_with_limit(tmp_path: Path) -> None:
    d = write(tmp_path, ['{"question": "q1", "answer": "a1\\n#### 1"}', '{"question": "q2", "answer": "#### 2"}'])
    items = load_gsm8k("test", limit=1, data_dir=d)
    assert [i.question for i in items] == ["q1"]
    assert items[0].text == "Question: q1\nAnswer: a1\n#### 1" and items[0].prompt == "Question: q1\nAnswer:"


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    d = write(tmp_path, ['{"question": "q1", "answer": "a"}', '{"question": "q2"}'])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'test.jsonl'}:2: malformed GSM8K line"):
        load_gsm8k("test", data_dir=d)


def test_directory_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GSM8K_ENV, str(write(tmp_path, ['{"question": "q", "answer": "a"}'])))
    assert len(load_gsm8k("test")) == 1
    monkeypatch.delenv(GSM8K_ENV)
    with pytest.raises(ValueError, match="pass --gsm8k-dir DIR or set HARNESS_GSM8K_DIR"):
        load_gsm8k("test")


def test_bad_split_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown GSM8K split 'dev'; valid splits: test, train"):
        load_gsm8k("dev", data_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_gsm8k("test", data_dir=tmp_path / "nope")


def test_the_configured_copy_is_complete() -> None:
    """The copy CI and the Makefile point $HARNESS_GSM8K_DIR at: 1319 test and 7473 train items."""
    if not os.environ.get(GSM8K_ENV):
        pytest.skip(f"{GSM8K_ENV} is not set (make test and .ci/run set it)")
    assert len(load_gsm8k("test")) == 1319 and len(load_gsm8k("train")) == 7473
