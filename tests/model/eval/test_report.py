"""Result dict, JSON + markdown files, the one-line JSON."""

from __future__ import annotations

import json

from model.eval.report import make_result, markdown_table, result_line, write_result


def test_result_files_and_table_layout(tmp_path):
    result = make_result("zeroshot_retrieval", "digits", "run/ckpt",
                         {f"{side}_retrieval_recall@{k}": k / 10 for side in ("image", "text") for k in (1, 5, 10)},
                         n_images=4)
    json_path, md_path = write_result(result, tmp_path / "out" / "r.json")
    assert json.loads(json_path.read_text()) == result == json.loads(result_line(result))
    assert "\n" not in result_line(result) and md_path == tmp_path / "out" / "r.md"
    lines = md_path.read_text().splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    row = [c.strip() for c in lines[4].strip("|").split("|")]
    assert header == ["model", "dataset", "I2T R@1", "I2T R@5", "I2T R@10", "T2I R@1", "T2I R@5", "T2I R@10"]
    assert row == ["`run/ckpt`", "digits", "10.0", "50.0", "100.0", "10.0", "50.0", "100.0"]


def test_unknown_task_lists_its_metrics_sorted():
    table = markdown_table(make_result("seg", "d", "m", {"pixel_acc": 0.5, "miou": 0.25}))
    assert "| model | dataset | miou | pixel_acc |" in table and "| `m` | d | 25.0 | 50.0 |" in table
