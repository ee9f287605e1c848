"""Bundled organisms: they load, match HF, and still score what their cards say."""

from __future__ import annotations

import math

import pytest
import torch

import interplab as il
from interplab.data.tasks.scorecard import scorecard
from interplab.models.organisms import organism_card, organism_names

ORGANISMS = organism_names()


def test_the_demo_organism_is_bundled():
    assert "storyworld-4l" in ORGANISMS


@pytest.mark.parametrize("name", ORGANISMS)
def test_card_is_complete(name):
    card = organism_card(name).data
    for key in (
        "description",
        "corpus_id",
        "corpus_hash",
        "steps",
        "seed",
        "final_eval_loss",
        "scorecard",
    ):
        assert key in card, f"{name}: card.json lacks {key}"
    assert math.isfinite(card["final_eval_loss"])


@pytest.mark.parametrize("name", ORGANISMS)
def test_loads_and_matches_hf(name):
    from transformers import AutoModelForCausalLM

    model = il.load_model(name, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(il.models.organism_path(name)).eval()
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    with torch.inference_mode():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4
    text = "On Monday, Tuesday and Wednesday the war lasted from 1732 to 1745."
    assert model.to_string(model.to_tokens(text, prepend_bos=False)[0]) == text or name.startswith(
        "code"
    )


@pytest.mark.parametrize("name", ORGANISMS)
def test_scorecard_reproduces_the_card(name):
    card = organism_card(name).data["scorecard"]
    phenomena = [row["phenomenon"] for row in card["rows"]]
    model = il.load_model(name, device="cpu")
    fresh = scorecard(model, phenomena, n=256, name=name)
    for saved, now in zip(card["rows"], fresh.rows, strict=True):
        assert now.phenomenon == saved["phenomenon"]
        assert abs(now.value - saved["value"]) < 0.02, (
            name,
            now.phenomenon,
            now.value,
            saved["value"],
        )
