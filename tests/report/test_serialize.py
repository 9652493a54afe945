"""The JSON text of a report: the same value json gives, laid out a record per line."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nhwc_audit.report.serialize import json_text

VALUES: list[Any] = [
    {},
    [],
    "x",
    3,
    None,
    {"a": [], "b": {}, "c": [1, {"d": [2, 3]}]},
    {1: 2, False: 3, None: [1, {"x": [1, 2]}], 1.5: "é", "s": (1, 2)},
    [[1, [2, [3]]], {"k": {"deep": {"deeper": [float("inf")]}}}],
]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("expand", [0, 1, 2, 5])
def test_json_text_is_the_value_json_gives(value: Any, expand: int) -> None:
    assert json.loads(json_text(value, expand=expand)) == json.loads(json.dumps(value, ensure_ascii=False))


def test_json_text_lays_out_records_one_per_line() -> None:
    value = {"summary": {"nodes": 2}, "nodes": [{"name": "a", "shape": [1, 2]}, {"name": "b", "shape": []}]}
    assert json_text(value, indent=2).splitlines() == [
        "{",
        '  "summary": {',
        '    "nodes": 2',
        "  },",
        '  "nodes": [',
        '    {"name": "a", "shape": [1, 2]},',
        '    {"name": "b", "shape": []}',
        "  ]",
        "}",
    ]
    assert json_text(value, indent=4).splitlines()[1] == '    "summary": {'
    assert "é" in json_text({"é": "é"})  # written as UTF-8, as the report files are
