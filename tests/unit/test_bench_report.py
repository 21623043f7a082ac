"""The benchmarks' common result schema and the RESULTS.md generator (benchmarks/common.py, benchmarks/report.py)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import common  # noqa: E402
import report  # noqa: E402


def test_goal_is_met_or_not_by_its_measured_value_and_unmeasured_is_none():
    assert common.goal("g", 1.6, ">=", 1.5)["met"] is True
    assert common.goal("g", 1.4, ">=", 1.5)["met"] is False
    assert common.goal("g", common.spread([1.0, 2.0, 9.0]), "<=", 2.0)["measured"] == 2.0  # the median of repeats
    assert common.goal("g", None, "<=", 2.0, note="not run: no GPU")["met"] is None
    with pytest.raises(ValueError, match="op"):
        common.goal("g", 1, "~", 1)


def test_spread_gives_min_median_max():
    f = common.spread([3, 1, 2], "s")
    assert (f["min"], f["median"], f["max"], f["n"], f["unit"]) == (1, 2, 3, 3, "s")


def test_write_result_then_render_marks_each_goal_and_names_the_machine(tmp_path):
    common.write_result("demo", title="Demo", question="q?", command="python benchmarks/bench_demo.py",
                        figures={"speed": common.spread([1, 2, 3], "tokens/s")},
                        goals=[common.goal("fast", 2.0, ">=", 1.5), common.goal("faster", 2.0, ">=", 5.0),
                               common.goal("on GPU", None, ">=", 1.0, note="not run: no GPU")],
                        plots=["results/demo.png"], results_dir=tmp_path)
    doc = json.loads((tmp_path / "demo.json").read_text())
    assert doc["schema"] == common.SCHEMA and doc["status"] == "ok" and doc["machine"]["description"]
    results = report.load_results(tmp_path)
    text = report.render("# R\n\n{{summary}}\n\n## Demo\n\nprose stays\n\n{{result:demo}}\n\n{{result:absent}}\n", results)
    assert "prose stays" in text
    assert "| fast | 2.00 | >= 1.50 | ✅ met |" in text
    assert "| faster | 2.00 | >= 5.00 | ❌ not met |" in text
    assert "— not run: no GPU" in text
    assert doc["machine"]["description"] in text
    assert "| Demo](#demo) `demo` | ok | 1 of 2 (1 not measured)" in text.replace("[Demo", "Demo")
    assert "![demo](results/demo.png)" in text
    assert "no `benchmarks/results/absent.json`" in text


def test_a_results_tables_render_under_its_title_with_units(tmp_path):
    common.write_result("demo", title="Demo", question="q?", command="python benchmarks/bench_demo.py", results_dir=tmp_path,
                        tables={"Redis traffic by command": {"columns": ["group", "calls/s", "bytes in/s"],
                                                             "units": ["", "/s", "B/s"],
                                                             "rows": [["EVALSHA register_worker", 125.2, 257300.0]]}})
    text = report.render("{{result:demo}}\n", report.load_results(tmp_path))
    assert "<summary>Redis traffic by command</summary>" in text
    assert "| group | calls/s | bytes in/s |" in text and "| --- | ---: | ---: |" in text
    assert "| EVALSHA register_worker | 125 /s | 257,300 B/s |" in text


def test_results_md_is_generated_from_the_committed_template_and_results():
    # RESULTS.md in the repository is what report.py makes of RESULTS.template.md and results/*.json
    assert report.main(["--check"]) == 0
