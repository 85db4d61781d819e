"""``perfkit list``: every entry with its parameters, FLOPs and input shape; globs, kinds and errors.
``perfkit device``: the report folder of the records' device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from perfkit.cli import _format_count, main
from perfkit.measure import step_flops
from perfkit.registry import create, get_entry, list_blocks
from perfkit.results import device_slug


def _rows(text: str) -> dict[str, list[str]]:
    # Columns: name, kind, params, FLOPs/sample, input (C,H,W), description (free text, last).
    lines = text.strip().splitlines()
    assert lines[0].split()[:3] == ["name", "kind", "params"], lines[0]
    return {line.split()[0]: line.split() for line in lines[1:]}


def test_list_shows_every_entry_with_params_flops_and_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert sorted(rows) == list_blocks()
    for name, (_, kind, params, flops, shape, *_) in rows.items():
        entry = get_entry(name)
        with torch.device("meta"):
            expected_params = sum(p.numel() for p in create(name).parameters())
        assert kind == entry.kind
        assert params == f"{expected_params:,}", f"{name}: params column {params}"
        assert shape == "x".join(map(str, entry.bench_shape)), f"{name}: shape column {shape}"
        assert flops[-1] in "kMG" and float(flops[:-1]) > 0, f"{name}: FLOPs column {flops}"
    # ResNet-50 at 224×224: 4.09 G multiply-adds, 8.18 GFLOPs as torch's counter counts them.
    resnet50_flops = step_flops(get_entry("resnet50"), 1, True, "inference", False)
    assert rows["resnet50"][3] == _format_count(resnet50_flops) == "8.18G"
    assert rows["resnet18"][2] == "11,689,512"


def test_list_glob(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "resnet*"]) == 0
    assert sorted(_rows(capsys.readouterr().out)) == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]


def test_list_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--kind", "block", "*dense*"]) == 0
    assert sorted(_rows(capsys.readouterr().out)) == ["dense", "dense_plain"]


def test_list_no_match_exits_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "nosuch*"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no block or network matches 'nosuch*'" in captured.err


def test_list_rejects_an_unknown_kind(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["list", "--kind", "layer"])
    assert info.value.code == 2
    assert "invalid choice: 'layer'" in capsys.readouterr().err


def test_help_reads_as_plain_text(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "history" in text and "report" in text


def test_device_prints_each_devices_report_folder(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    """``perfkit device`` names the folder ``perfkit report`` writes for the records, once per device."""
    committed = sorted(Path(__file__).resolve().parents[1].glob("reports/*/bench.json"))
    assert committed, "the committed reports are the test's input"
    assert main(["device", *map(str, committed), str(committed[0])]) == 0
    assert capsys.readouterr().out.splitlines() == [path.parent.name for path in committed]
    # JSON lines: the records' own device (these old records lack the ISA that pytest-benchmark's
    # machine_info supplies beside them, so their folder name is shorter).
    records = [bench["extra_info"] for bench in json.loads(committed[0].read_text())["benchmarks"]]
    lines = tmp_path / "results.jsonl"
    lines.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main(["device", str(lines)]) == 0
    assert capsys.readouterr().out == f"{device_slug(records[0]['device'])}\n"


def test_device_refuses_what_holds_no_record(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["device", str(empty)]) == 2
    assert "empty file" in capsys.readouterr().err
    no_cells = tmp_path / "bench.json"
    no_cells.write_text(json.dumps({"benchmarks": []}))
    assert main(["device", str(no_cells)]) == 2
    assert f"no records in {no_cells}" in capsys.readouterr().err
