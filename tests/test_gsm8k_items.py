"""The GSM8K JSONL reader."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from harness.gsm8k import GSM8K_ENV, Gsm8kItem, gsm8k_file, load_gsm8k
from harness.paths import data_dir


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


def test_directory_from_the_environment_else_the_packaged_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GSM8K_ENV, str(write(tmp_path, ['{"question": "q", "answer": "a"}'])))
    assert len(load_gsm8k("test")) == 1
    monkeypatch.delenv(GSM8K_ENV)
    assert gsm8k_file("test") == data_dir() / "gsm8k" / "test.jsonl.gz"
    assert load_gsm8k("test", 1)[0].question.startswith("Janet\u2019s ducks lay 16 eggs per day.")


def test_gzip_compressed_splits_are_read(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"question": "q\u00e9", "answer": "#### 1"}\n')
    assert load_gsm8k("train", data_dir=tmp_path) == [Gsm8kItem("q\u00e9", "#### 1")]
    with pytest.raises(ValueError, match=r"has neither test\.jsonl nor test\.jsonl\.gz"):
        load_gsm8k("test", data_dir=tmp_path)


def test_bad_split_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown GSM8K split 'dev'; valid GSM8K splits: test, train"):
        load_gsm8k("dev", data_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_gsm8k("test", data_dir=tmp_path / "nope")


def test_the_packaged_copy_is_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy shipped in the package: GSM8K's 1319 test and 7473 train items, byte-identical to
    openai/grade-school-math's JSONL (the sha256 sums its README records), with its MIT license."""
    monkeypatch.delenv(GSM8K_ENV, raising=False)
    folder = data_dir() / "gsm8k"
    assert len(load_gsm8k("test")) == 1319 and len(load_gsm8k("train")) == 7473
    readme = (folder / "README.md").read_text()
    for split in ("test", "train"):
        digest = hashlib.sha256(gzip.decompress((folder / f"{split}.jsonl.gz").read_bytes())).hexdigest()
        assert f"`{split}.jsonl.gz` | " in readme and digest in readme
    assert (folder / "LICENSE").read_text().startswith("MIT License")
