"""Scorecard rows for the Python phenomena: closer accuracy and top-1 recomputed by hand from
the model's logits; the default phenomena leave the code tasks out."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import interplab as il
from interplab.data.corpus.tokenizer import build_tokenizer, to_hf_tokenizer
from interplab.data.tasks import code_brackets, code_quotes
from interplab.data.tasks.scorecard import CODE_PHENOMENA, DEFAULT_PHENOMENA, scorecard

CODE = [
    "def f(self, x):\n    return d['key'] + g(x, [1, 2], {3: 4}) + e[\"a\"]\n",
    "    if x == 'a':\n        y = (x, [x]) or {x} or \"b\"\n",
]


def tiny_code_model():
    tok = to_hf_tokenizer(build_tokenizer(CODE * 20, 400, required=[" (", " [", " {", " '", ' "']))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64)
    config.bos_token_id = config.eos_token_id = 0
    return il.load_model(GPT2LMHeadModel(config).eval(), device="cpu", tokenizer=tok)


def test_code_rows_equal_a_hand_computation():
    model = tiny_code_model()
    card = scorecard(model, list(CODE_PHENOMENA), n=32)
    for name, task in (("code_brackets", code_brackets), ("code_quotes", code_quotes)):
        ds = task(model, n=32)
        with torch.inference_mode():
            logits = model(ds.clean_tokens)[torch.arange(len(ds)), ds.answer_pos]
        wrong = ds.wrong_answers.reshape(len(ds), -1)
        diff = logits.gather(1, ds.answers[:, None])[:, 0] - logits.gather(1, wrong).max(1).values
        row = next(r for r in card.rows if r.phenomenon == name)
        assert row.metric == "closer accuracy" and row.n == 32
        assert abs(row.value - (diff > 0).float().mean().item()) < 1e-6
        assert abs(row.logit_diff_mean - diff.mean().item()) < 1e-4
        top1 = (logits.argmax(1) == ds.answers).float().mean().item()
        assert abs(row.extra["top1_accuracy"] - top1) < 1e-6


def test_defaults_are_the_storyworld_phenomena():
    assert "induction" in DEFAULT_PHENOMENA
    assert not set(CODE_PHENOMENA) & set(DEFAULT_PHENOMENA)
