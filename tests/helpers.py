"""Helpers shared by several test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from infinitrain.data import load_tokenizer
from infinitrain.model import InfiniTransformer, preset
from infinitrain.model_dir import save_model_dir

REPO = Path(__file__).resolve().parent.parent
TINY_RECIPE = "description: a tiny test model\nmodel:\n  preset: tiny\n  segment_len: 8\n"
"""What the runs below record as their recipe."""


def one_line_error(result, expected: str) -> None:
    """A CLI result that failed as a user error: exit code 2, one line on stderr starting with
    'Error:' and containing ``expected``, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and expected in lines[0], lines


def write_run(run: Path, tie: bool = True, vocab_size: int = 4096, segment_len: int = 8,
              **overrides) -> Path:
    """A training run's layout around a tiny random model: run/step-00000010/ (model directory,
    the bundled tokenizer, recipe.yaml) and run/latest. Gates differ per head, so the memory
    visibly matters; with the write gate, some tokens write, some not, some in between."""
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=vocab_size, d_model=32, ffn_dim=64,
                    segment_len=segment_len, tie_embeddings=tie, **overrides)
    model = InfiniTransformer(config)
    with torch.no_grad():
        for block in model.layers:
            if block.attn.has_memory:
                block.attn.gate.normal_(0, 2)
                if config.memory_write_gate:
                    block.attn.write_weight.normal_(0, 2)
    step = save_model_dir(model, run / "step-00000010")
    load_tokenizer(REPO / "data" / "tokenizer").save(step / "tokenizer")
    (step / "recipe.yaml").write_text(TINY_RECIPE)
    (run / "latest").write_text("step-00000010\n")
    return step
