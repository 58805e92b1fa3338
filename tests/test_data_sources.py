"""Source strings, directories, config validation."""

from __future__ import annotations

import json

import pytest

from finetune.data.args import DataArgs, InstructArgs
from finetune.data.dataset import train_sources
from finetune.data.sources import parse_sources, split_source_string
from finetune.data.tokenize import SampleType
from tests.data_helpers import write_jsonl

LINE = {"text": "hello"}


@pytest.mark.parametrize(
    "spec, want",
    [
        ("a.jsonl", [("a.jsonl", 1.0)]),
        (" a.jsonl:2 , b:0.5,, ", [("a.jsonl", 2.0), ("b", 0.5)]),
        ("C:\\data\\x.jsonl:2", [("C:\\data\\x.jsonl", 2.0)]),
        ("C:\\data\\x.jsonl", [("C:\\data\\x.jsonl", 1.0)]),
        ("D:/d/x.jsonl:1e-1,C:\\y", [("D:/d/x.jsonl", 0.1), ("C:\\y", 1.0)]),
        ("s3://bucket/x.jsonl", [("s3://bucket/x.jsonl", 1.0)]),
        ("", []),
    ],
)
def test_split_source_string(spec, want) -> None:
    assert split_source_string(spec, "data.instruct_data") == want


@pytest.mark.parametrize("spec", ["a.jsonl:0", "a.jsonl:-1", "C:\\x.jsonl:-2", "a.jsonl:nan", "a.jsonl:inf"])
def test_non_positive_weight(spec) -> None:
    with pytest.raises(ValueError, match=r"data.instruct_data: source .* weights must be positive numbers"):
        split_source_string(spec, "data.instruct_data")


def test_windows_style_file_name_resolves(tmp_path, monkeypatch) -> None:
    # On POSIX "C:\data\x.jsonl" is an ordinary file name: the colon must not be taken for a weight.
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "C:\\data\\x.jsonl", [LINE])
    [source] = parse_sources("C:\\data\\x.jsonl:2", "data.data", SampleType.PRETRAIN)
    assert source.weight == 2.0
    assert [p.name for p in source.files] == ["C:\\data\\x.jsonl"]


def test_directory_recursive_sorted(tmp_path) -> None:
    for name in ["b/2.jsonl", "a.jsonl", "b/1.jsonl", "c/d/e.jsonl", "notes.txt", "b/10.jsonl"]:
        write_jsonl(tmp_path / "d" / name, [LINE])
    [source] = parse_sources(str(tmp_path / "d"), "data.data", SampleType.PRETRAIN)
    rel = [p.relative_to(tmp_path / "d").as_posix() for p in source.files]
    assert rel == ["a.jsonl", "b/1.jsonl", "b/10.jsonl", "b/2.jsonl", "c/d/e.jsonl"]


def test_missing_and_empty(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="data.instruct_data: .*nope.jsonl does not exist"):
        parse_sources(str(tmp_path / "nope.jsonl"), "data.instruct_data", SampleType.INSTRUCT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no .jsonl files"):
        parse_sources(str(tmp_path / "empty"), "data.instruct_data", SampleType.INSTRUCT)


def test_duplicates(tmp_path) -> None:
    f = write_jsonl(tmp_path / "d" / "a.jsonl", [LINE])
    with pytest.raises(ValueError, match="is used twice"):
        train_sources(DataArgs(instruct_data=f"{f},{f}:2"))
    with pytest.raises(ValueError, match="by data.data entry .* and by data.instruct_data entry"):
        train_sources(DataArgs(data=str(f), instruct_data=str(tmp_path / "d")))


def test_data_args_validate() -> None:
    with pytest.raises(
        ValueError, match="data.data and data.instruct_data are both empty.*data.instruct_data: /path"
    ):
        DataArgs().validate()
    with pytest.raises(ValueError, match="data.eval_instruct_data: source 'x:0'"):
        DataArgs(instruct_data="a", eval_instruct_data="x:0").validate()
    with pytest.raises(
        ValueError, match="data.long_sample_policy is 'cut'; use one of split, truncate, drop"
    ):
        DataArgs(instruct_data="a", long_sample_policy="cut").validate()
    DataArgs(instruct_data="a.jsonl:3", instruct=InstructArgs(shuffle=False)).validate()
    json.dumps(DataArgs().__dict__, default=lambda o: o.__dict__)  # plain data, serialisable
