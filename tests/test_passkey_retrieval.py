"""In a minute per seed: the memory, and only the memory, retrieves a key from an earlier segment.

A small Infini-Transformer is trained through the real pipeline (recipe, passkey source, Lightning,
checkpoint) on an easy setting: one-digit keys, the needle right after the task text, four segments
of 32 tokens. Every prompt ends on a segment boundary, so the question's segment never contains the
needle and the answer digit is generated in a fresh segment: local attention cannot see the key.
Two seeds: whether the path through memory forms must not depend on a lucky initialisation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infinitrain.data.tokenizer import load_tokenizer
from infinitrain.evaluation.passkey import PasskeySettings, evaluate_passkey
from infinitrain.inference.loading import load_model
from infinitrain.recipe.loading import parse_recipe
from infinitrain.training.run import train

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 128
KEYS = (1, 9)
CHANCE = 1 / 9
STEPS = 400


def easy_passkey_recipe(steps: int, seed: int) -> dict:
    return {
        "model": {"preset": "tiny", "d_model": 64, "n_heads": 2, "n_kv_heads": 2,
                  "ffn_dim": 128, "segment_len": 32, "memory_rule": "deltanet"},
        "data": {"tokenizer": "data/tokenizer", "window_tokens": 160, "streams": 16,
                 "sources": [{"kind": "passkey", "passkey_length": PROMPT_TOKENS,
                              "depth_min": 0.0, "depth_max": 0.0,
                              "key_min": KEYS[0], "key_max": KEYS[1]}]},
        "optim": {"lr": 3e-3, "gate_lr_multiplier": 10, "warmup_steps": 20,
                  "weight_decay": 0.0},
        "train": {"max_steps": steps, "seed": seed, "precision": "32-true",
                  "accelerator": "cpu"},
        "checkpoint": {"every_steps": steps, "keep_last": 1},
        "logging": {"every_steps": 50, "tensorboard": False},
    }


@pytest.fixture(scope="module", params=[0, 1], ids=lambda seed: f"seed{seed}")
def trained_model(request, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp(f"passkey-easy-seed{request.param}")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the recipe's data paths are relative to the repository
        train(parse_recipe(easy_passkey_recipe(steps=STEPS, seed=request.param)),
              "passkey-easy", out)
    return load_model(out).model


def accuracy(model, use_memory: bool) -> float:
    settings = PasskeySettings(lengths=(PROMPT_TOKENS,), depths=(0.0,), samples=40, seed=123,
                               use_memory=use_memory, key_min=KEYS[0], key_max=KEYS[1])
    return evaluate_passkey(model, load_tokenizer(REPO / "data/tokenizer"), settings).accuracy()


def test_memory_retrieves_a_key_outside_the_last_segment_and_local_attention_cannot(
        trained_model) -> None:
    n = trained_model.config.segment_len
    assert PROMPT_TOKENS % n == 0  # the answer starts a fresh segment
    with torch.no_grad():
        with_memory = accuracy(trained_model, use_memory=True)
        without_memory = accuracy(trained_model, use_memory=False)
    # ≥ 5× chance: after 400 steps seed 1 scores 78%; without a memory layer seed 0 scores 8%
    assert with_memory >= 0.6, f"memory on: {with_memory:.0%} (chance {CHANCE:.0%})"
    assert without_memory <= 0.35, f"memory off: {without_memory:.0%} (chance {CHANCE:.0%})"
