"""`inspect needle-trace`: what a passkey needle leaves in the compressive memory, on real models.

A random tiny model is enough for the properties that follow from the memory rules themselves: the
needle's trace is exactly 0 until its segment is written, the paper's linear rule keeps its share
of M falling like 1/segments (layer 0's keys and values depend on the token alone, so there the
difference M_with − M_without is frozen once the needle has been written), and DeltaNet's memory
settles under the repeated filler instead of growing by the same amount every segment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.data.passkey import PasskeyGenerator
from infinitrain.evaluation.needle_trace import (
    NeedleTraceResult,
    filler_segments,
    needle_trace,
    report_points,
    trace_sample,
)
from infinitrain.model import InfiniTransformer, preset
from infinitrain.model_dir import save_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizer"
SEGMENT = 16
LENGTH = 2048  # 128 segments


def tiny_model(rule: str) -> InfiniTransformer:
    torch.manual_seed(0)
    return InfiniTransformer(preset("tiny", d_model=32, ffn_dim=64, segment_len=SEGMENT,
                                    memory_rule=rule)).eval()


@pytest.fixture(scope="module")
def generator(data_tokenizer) -> PasskeyGenerator:
    return PasskeyGenerator(data_tokenizer)


@pytest.mark.parametrize("rule", ["linear", "delta", "deltanet"])
def test_trace_is_zero_until_the_needle_is_written(generator, rule):
    sample = trace_sample(tiny_model(rule), generator, 1024, 0.4, seed=3)
    segments = filler_segments(generator, 1024, SEGMENT)  # up to the question's segment
    assert segments == 1024 // SEGMENT - 1 and 0 < sample.first_segment <= sample.needle_segment
    assert sample.trace.shape == (segments, 2, 2)  # segments, layers, kv heads
    assert torch.equal(sample.trace[:sample.first_segment],
                       torch.zeros_like(sample.trace[:sample.first_segment]))
    assert (sample.trace[sample.first_segment:] > 0).all()
    assert (sample.memory_norm > 0).all() and (sample.z_norm > 0).all()


def test_linear_rule_dilutes_the_needle(generator):
    sample = trace_sample(tiny_model("linear"), generator, LENGTH, 0.0, seed=1)
    after = slice(sample.needle_segment, None)
    trace, size = sample.trace[after], sample.memory_norm[after]
    # Layer 0 writes the same keys and values in both prompts after the needle: the difference
    # stays exactly what the needle wrote while the memory keeps growing around it.
    difference = trace[:, 0] * size[:, 0]
    torch.testing.assert_close(difference, difference[:1].expand_as(difference), rtol=1e-4,
                               atol=0)
    assert (size[-1] > 3 * size[0]).all()
    assert (trace[-1] < trace[0] / 3).all()
    assert (trace[-1] < trace[len(trace) // 4]).all()


def test_deltanet_memory_settles_under_repeated_filler(generator):
    rule_samples = {rule: trace_sample(tiny_model(rule), generator, LENGTH, 0.0, seed=1)
                    for rule in ("linear", "deltanet")}
    net = rule_samples["deltanet"]
    change = net.change[net.needle_segment:]
    assert (change[-1] < 0.1).all() and (change[-1] < change[0] / 5).all()
    # Absolute change per segment: DeltaNet's shrinks; the linear rule adds as much every segment.
    for rule, sample in rule_samples.items():
        step = (sample.change * sample.memory_norm)[sample.needle_segment:]
        shrink = (step[-8:].mean(0) / step[1:9].mean(0)).max().item()
        assert shrink < 0.7 if rule == "deltanet" else shrink > 0.7, (rule, shrink)


def test_result_aligns_samples_on_the_needle(data_tokenizer):
    result = needle_trace(tiny_model("deltanet"), data_tokenizer, 1024, 0.0, samples=2)
    assert isinstance(result, NeedleTraceResult) and len(result.samples) == 2
    assert result.n_layers == 2 and len(result.trace[0]) == len(result.after)
    assert result.after[0] == 0 and result.points()[:4] == [0, 1, 4, 16]
    assert result.points()[-1] == result.after[-1]
    first = result.samples[0]
    torch.testing.assert_close(
        torch.tensor(result.trace_max_head[0][0], dtype=torch.float64),
        (first.trace[first.needle_segment, 0].amax().double()
         + result.samples[1].trace[result.samples[1].needle_segment, 0].amax()) / 2)
    assert result.to_dict()["samples"][0]["trace_before_needle"] == 0.0
    assert report_points(1) == [0] and report_points(20) == [0, 1, 4, 16, 19]


def test_cli_writes_table_plot_and_json(tmp_path):
    run = tmp_path / "run"
    save_model_dir(tiny_model("linear"), run / "step-00000001", tokenizer_dir=TOKENIZER)
    (run / "latest").write_text("step-00000001")
    plot, out = tmp_path / "trace.png", tmp_path / "trace.json"
    result = CliRunner().invoke(app, ["inspect", "needle-trace", "--model", str(run),
                                      "--length", "1k", "--depth", "0.25", "--samples", "2",
                                      "--plot", str(plot), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "Needle trace" in result.stdout and "1K tokens" in result.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG" and plot.stat().st_size > 1000
    saved = json.loads(out.read_text())
    assert saved["command"] == "inspect needle-trace"
    assert saved["settings"] == {"length": 1024, "depth": 0.25, "samples": 2, "seed": 0}
    assert len(saved["results"]["trace"]) == 2 and saved["results"]["after_segments"][0] == 0

    for option, args in (("--length", ["--length", "40"]), ("--depth", ["--depth", "1"])):
        bad = CliRunner().invoke(app, ["inspect", "needle-trace", "--model", str(run),
                                       "--length", "1k", *args])
        assert bad.exit_code == 2 and f"Error: {option}" in bad.stderr, bad.output
