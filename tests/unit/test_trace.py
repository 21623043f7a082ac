"""Routing traces (JSONL) and expert-count dumps of SGLang and vLLM read as traces."""

import json

import numpy as np
import pytest
import torch

from moefleet.core.expert_stats import counts_to_trace, load_expert_counts, physical_to_logical
from moefleet.core.trace import Trace, TraceError, TraceLine, read_trace, write_trace


def test_write_then_read_gives_the_same_lines_sorted_by_time(tmp_path):
    lines = [TraceLine(0.5, 3, (1, 0, 2)), TraceLine(0.25, 1, (0, 7, 0)), TraceLine(0.5, 1, (4, 4, 4))]
    path = write_trace(tmp_path / "t.jsonl", lines)
    back = read_trace(path)
    assert list(back.lines()) == [lines[1], lines[0], lines[2]]  # by t, ties in file order
    assert back.layers == [1, 3] and back.num_experts == 3 and back.duration_s == 0.5
    assert path.read_text().splitlines()[0] == '{"t":0.25,"layer":1,"counts":[0,7,0]}'


def test_load_sums_counts_per_layer_over_a_time_window():
    trace = Trace.from_lines([TraceLine(0.0, 2, (1, 2)), TraceLine(1.0, 2, (10, 20)), TraceLine(1.5, 5, (3, 0))])
    assert trace.load().tolist() == [[11, 22], [3, 0]]
    assert trace.load(0.5, 2.0).tolist() == [[10, 20], [3, 0]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"t": 0, "layer": 0, "counts": [1, 2]}\nnot json', "line 2: not JSON"),
        ('{"t": -1, "layer": 0, "counts": [1]}', "line 1: t must be"),
        ('{"t": 0, "layer": 1.5, "counts": [1]}', "line 1: layer must be"),
        ('{"t": 0, "layer": 0, "counts": [1, -2]}', r"line 1: counts\[1\] must be"),
        ('{"t": 0, "layer": 0}', "line 1: missing field 'counts'"),
        ('{"t": 0, "layer": 0, "counts": [1], "tokens": 3}', "line 1: unknown field 'tokens'"),
        ('{"t": 0, "layer": 0, "counts": [1, 2]}\n{"t": 1, "layer": 0, "counts": [1]}', "line 2: counts has 1 experts"),
        ("\n\n", "has no lines"),
    ],
)
def test_a_malformed_trace_names_the_line_and_field(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        read_trace(path)


def test_a_missing_trace_file_is_a_trace_error(tmp_path):
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "absent.jsonl")


# --- expert-count dumps ----------------------------------------------------------------------------------------


def test_sglang_stat_dump_pt_gives_one_snapshot_per_forward_pass(tmp_path):
    counts = torch.randint(0, 50, (5, 3, 8), dtype=torch.int32)  # [buffered passes, layers, logical experts]
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, tmp_path / "d.pt")
    loaded = load_expert_counts(tmp_path / "d.pt")
    assert loaded.shape == (5, 3, 8)
    np.testing.assert_array_equal(loaded, counts.numpy())


def test_sglang_init_expert_location_json_with_two_dim_counts(tmp_path):
    (tmp_path / "loc.json").write_text(json.dumps({"logical_count": [[1, 2, 3], [4, 5, 6]]}))
    assert load_expert_counts(tmp_path / "loc.json").tolist() == [[[1, 2, 3], [4, 5, 6]]]


def test_sglang_per_token_records_map_physical_slots_to_logical_experts(tmp_path):
    mapping = torch.tensor([[0, 1, 2, 0], [2, 1, 0, 1]])  # [layers, physical slots]: expert 0 twice in layer 0
    records = [{"forward_pass_id": i, "global_physical_count": torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]) * (i + 1)}
               for i in range(2)]
    torch.save({"records": records, "last_physical_to_logical_map": mapping}, tmp_path / "r.pt")
    loaded = load_expert_counts(tmp_path / "r.pt")
    assert loaded[0].tolist() == [[5, 2, 3], [7, 14, 5]]
    assert loaded[1].tolist() == [[10, 4, 6], [14, 28, 10]]


def test_vllm_load_window_with_unused_slots(tmp_path):
    window = np.arange(2 * 2 * 5).reshape(2, 2, 5)  # [window steps, layers, physical slots]
    mapping = [[0, 1, 2, -1, 0], [1, -1, 2, 0, 2]]  # -1: an unused slot, dropped
    (tmp_path / "v.json").write_text(json.dumps({"expert_load_window": window.tolist(), "physical_to_logical_map": mapping}))
    loaded = load_expert_counts(tmp_path / "v.json")
    expected = physical_to_logical(window, np.array(mapping), 3)
    np.testing.assert_array_equal(loaded, expected)
    assert loaded[0, 0].tolist() == [0 + 4, 1, 2]
    assert loaded[0, 1].tolist() == [8, 5, 7 + 9]


def test_a_dump_without_counts_names_what_it_expected(tmp_path):
    torch.save({"something": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(TraceError, match="no expert counts found"):
        load_expert_counts(tmp_path / "x.pt")
    torch.save({"expert_load_pass": torch.zeros(2, 4)}, tmp_path / "y.pt")
    with pytest.raises(TraceError, match="physical_to_logical_map: missing"):
        load_expert_counts(tmp_path / "y.pt")
    (tmp_path / "n.json").write_text(json.dumps({"logical_count": [[1, -1]]}))
    with pytest.raises(TraceError, match="logical_count: counts must be finite and >= 0"):
        load_expert_counts(tmp_path / "n.json")


def test_counts_become_a_trace_one_line_per_layer_per_snapshot():
    counts = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
    trace = counts_to_trace(counts, period_s=0.5, layers=[3, 7])
    assert [(x.t, x.layer, x.counts) for x in trace.lines()] == [
        (0.0, 3, (1, 2)), (0.0, 7, (3, 4)), (0.5, 3, (5, 6)), (0.5, 7, (7, 8)),
    ]
