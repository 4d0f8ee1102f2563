"""The scaling model of bench/scaling_model.py: the ring formula, the efficiency, and the page section it
renders from a results file (measurement records written by bench/_common.measure)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import _common  # noqa: E402
import scaling_model as sm  # noqa: E402


def test_one_rank_communicates_nothing_and_keeps_full_efficiency():
    assert sm.ring_allreduce_seconds(nbytes=1e8, ranks=1, bandwidth=1e9, alpha=1e-5) == 0
    for overlap in (False, True):
        assert sm.predict(params=340e6, compute=0.1, ranks=1, link_gbit=25, fp16=False, overlap=overlap) == 1.0


def test_hand_computed_cell_resnet50_8_gpus_25_gbit_fp32():
    # 2*7/8 * 102.4e6 B / 3.125e9 B/s = 57.344 ms, + 14 hops * 10 us = 57.484 ms; compute 256/2375 s
    comm = sm.ring_allreduce_seconds(nbytes=25.6e6 * 4, ranks=8, bandwidth=25e9 / 8, alpha=10e-6)
    assert comm == pytest.approx(0.057484, rel=1e-9)
    compute = 256 / 2375
    assert sm.predict(params=25.6e6, compute=compute, ranks=8, link_gbit=25, fp16=False, overlap=False) == \
        pytest.approx(compute / (compute + 0.057484), rel=1e-9)
    assert compute / (compute + 0.057484) == pytest.approx(0.6522, abs=1e-4)
    # overlap: 2/3 of 107.8 ms = 71.9 ms > 57.5 ms, all hidden
    assert sm.predict(params=25.6e6, compute=compute, ranks=8, link_gbit=25, fp16=False, overlap=True) == 1.0


def test_doubling_bandwidth_halves_the_bandwidth_term_and_fp16_halves_the_bytes():
    slow = sm.ring_allreduce_seconds(nbytes=1e8, ranks=64, bandwidth=1e9, alpha=0)
    assert sm.ring_allreduce_seconds(nbytes=1e8, ranks=64, bandwidth=2e9, alpha=0) == pytest.approx(slow / 2)
    assert sm.ring_allreduce_seconds(nbytes=1e8, ranks=64, bandwidth=2e9, alpha=1e-5) < \
        sm.ring_allreduce_seconds(nbytes=1e8, ranks=64, bandwidth=1e9, alpha=1e-5)
    # fp16 at B is exactly fp32 at 2B (the latency term is the same)
    for ranks in (8, 512):
        fp16 = sm.predict(params=340e6, compute=0.5, ranks=ranks, link_gbit=25, fp16=True, overlap=False)
        fp32 = sm.predict(params=340e6, compute=0.5, ranks=ranks, link_gbit=50, fp16=False, overlap=False)
        assert fp16 == pytest.approx(fp32, rel=1e-12)


def test_latency_term_grows_with_ranks():
    assert sm.ring_allreduce_seconds(nbytes=0, ranks=512, bandwidth=1e9, alpha=1e-5) == pytest.approx(1022e-5)


@pytest.mark.parametrize("comm", [0.0, 0.01, 0.05, 0.2, 1.0, 10.0])
def test_overlap_never_lowers_efficiency_and_efficiency_is_at_most_one(comm):
    plain = sm.efficiency(compute=0.1, comm=comm, overlap=False)
    hidden = sm.efficiency(compute=0.1, comm=comm, overlap=True)
    assert 0 < plain <= hidden <= 1
    # what overlap cannot hide is exposed: 1 s of comm, 2/3 of 0.1 s hidden
    assert sm.efficiency(compute=0.1, comm=1.0, overlap=True) == pytest.approx(0.1 / (0.1 + 1.0 - 0.2 / 3))


def test_compute_for_inverts_efficiency():
    for overlap in (False, True):
        compute = sm.compute_for(0.68, comm=0.364, overlap=overlap)
        assert sm.efficiency(compute=compute, comm=0.364, overlap=overlap) == pytest.approx(0.68)


def test_bad_inputs_are_refused_with_the_value():
    with pytest.raises(ValueError, match="ranks=0"):
        sm.ring_allreduce_seconds(nbytes=1, ranks=0, bandwidth=1, alpha=0)
    with pytest.raises(ValueError, match="compute=0"):
        sm.efficiency(compute=0, comm=1, overlap=False)
    with pytest.raises(ValueError, match="backward_fraction=1.5"):
        sm.efficiency(compute=1, comm=1, overlap=True, backward_fraction=1.5)


def test_p4_cnn_gradient_bytes_match_its_layers():
    # 3x3 convolutions with bias: (9 * in + 1) * out; Dense (8*8*32 -> 10) with bias
    convs = [(3, 16), (16, 16), (16, 32), (32, 32)]
    params = sum((9 * i + 1) * o for i, o in convs) + (8 * 8 * 32 + 1) * 10
    assert sm.P4_CNN_BYTES == params * 4 == 37146 * 4


def test_measure_records_are_read_back_and_are_not_ratio_rows(tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    monkeypatch.setenv("BENCH_RESULTS", str(results))
    _common.record("P4 Horovod gloo", [0.5, 0.4, 0.6], ">= 0.9")
    _common.record("P4 2 independent", [0.8, 0.8, 0.9], None)
    _common.measure("P4 step time, one process", 0.05, "s", "test")
    _common.measure("P3 64 MiB bandwidth, Horovod gloo", 0.6, "GB/s", "test")
    _common.measure("P3 1 KiB time, Horovod path", 0.001, "s", "test")
    measured = _common.measurements()
    assert measured["P4 step time, one process"]["value"] == 0.05
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["row"] for r in lines if "ratios" in r] == ["P4 Horovod gloo", "P4 2 independent"]
    page = sm.report(str(results))
    assert "| measured efficiency | 0.50 |" in page
    assert "| compute per step, one process | 50.0 ms |" in page
    assert "| 25 Gb/s, fp32 | 0.65 / 1.00 |" in page  # ResNet-50, 8 GPUs: the hand-computed cell
    assert page.count("| 400 Gb/s, fp16 |") == 2  # one grid per model


def test_section_renders_without_measurements(tmp_path):
    page = sm.report(str(tmp_path / "absent.jsonl"))
    assert "not available in this run" in page and "| BERT-large: link, gradients |" in page


def test_grid_summary_sentence_matches_the_grid():
    """The page's 'What the grid says' claims, checked against the numbers it prints."""
    def cell(model, n, link, fp16, overlap):
        params, compute, _ = sm.MODELS[model]
        return sm.predict(params=params, compute=compute, ranks=n, link_gbit=link, fp16=fp16, overlap=overlap)

    assert cell("ResNet-50", 512, 400, False, False) >= 0.85 > cell("ResNet-50", 512, 100, False, False)
    assert all(cell("BERT-large", n, 25, False, False) < 0.5 for n in sm.GPUS)
    for model in sm.MODELS:
        for link in sm.LINKS_GBIT:
            for fp16 in (False, True):
                drop = cell(model, 8, link, fp16, False) - cell(model, 512, link, fp16, False)
                assert 0 < drop <= 0.09
                if (model, link, fp16) != ("BERT-large", 25, False):
                    assert cell(model, 512, link, fp16, True) >= 0.96


def test_check_says_which_way_the_model_misses(tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    monkeypatch.setenv("BENCH_RESULTS", str(results))
    _common.record("P4 Horovod gloo", [0.5], ">= 0.9")
    _common.measure("P4 step time, one process", 0.05, "s", "test")
    _common.measure("P3 64 MiB bandwidth, Horovod gloo", 0.6, "GB/s", "test")
    _common.measure("P3 1 KiB time, Horovod path", 0.001, "s", "test")
    assert "the wire is not what costs a step" in sm.report(str(results))  # predicts ~0.98 > 0.5
    _common.measure("P3 1 KiB time, Horovod path", 0.2, "s", "test")  # the last record of a name wins
    assert "charges more communication" in sm.report(str(results))  # predicts ~0.2 < 0.5
