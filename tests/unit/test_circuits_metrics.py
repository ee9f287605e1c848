"""Circuit metrics: closed forms by hand, exact normalisation endpoints, Estimate, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import interplab as il
from interplab import circuits as C
from interplab.data.tasks import TaskDataset
from interplab.errors import InterplabError
from tests.conftest import VOCAB, make_hf_model, make_tokenizer


def random_task(batch=4, pos=6, seed=0, n_wrong=None):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, VOCAB, (batch, pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(1, VOCAB, (batch,), generator=g)
    wrong_shape = (batch,) if n_wrong is None else (batch, n_wrong)
    return TaskDataset(
        name="random",
        prompts=[""] * batch,
        corrupted_prompts=[""] * batch,
        clean_tokens=clean,
        corrupted_tokens=corrupted,
        answers=torch.randint(1, VOCAB, (batch,), generator=g),
        wrong_answers=torch.randint(1, VOCAB, wrong_shape, generator=g),
        answer_pos=torch.randint(2, pos, (batch,), generator=g),
        metadata=[{}] * batch,
    )


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return il.load_model(make_hf_model("gpt2"), device="cpu")


def test_logit_diff_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 11, generator=g)  # [copy, batch, pos, vocab]
    answers, wrong, pos = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), torch.tensor([4, 0, 2])
    got = C.logit_diff(logits, answers, wrong, pos)
    assert got.shape == (2, 3)
    for c in range(2):
        for b in range(3):
            expected = logits[c, b, pos[b], answers[b]] - logits[c, b, pos[b], wrong[b]]
            assert got[c, b] == expected
    several = torch.tensor([[4, 7], [5, 8], [6, 9]])
    got = C.logit_diff(logits[0], answers, several, pos)
    for b in range(3):
        row = logits[0, b, pos[b]]
        assert torch.isclose(
            got[b], row[answers[b]] - (row[several[b, 0]] + row[several[b, 1]]) / 2
        )


def test_prob_logprob_accuracy_kl_by_hand():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 7, generator=g)
    answers, pos = torch.tensor([0, 3, 6]), torch.tensor([3, 1, 0])
    for b in range(3):
        row = logits[b, pos[b]].double()
        p = row.exp() / row.exp().sum()
        assert math.isclose(
            C.answer_prob(logits, answers, pos)[b].item(), p[answers[b]].item(), rel_tol=1e-5
        )
        assert math.isclose(
            C.answer_logprob(logits, answers, pos)[b].item(), math.log(p[answers[b]]), rel_tol=1e-5
        )
        assert C.accuracy(logits, answers, pos)[b].item() == float(row.argmax() == answers[b])
    reference = torch.randn(3, 7, generator=g)
    kl = C.kl_div(logits, reference, pos)
    for b in range(3):
        p = torch.softmax(reference[b].double(), -1)
        q = torch.softmax(logits[b, pos[b]].double(), -1)
        assert math.isclose(kl[b].item(), (p * (p / q).log()).sum().item(), rel_tol=1e-4)
    top = logits[torch.arange(3), pos].argmax(-1)
    assert C.accuracy(logits, top, pos).tolist() == [1.0, 1.0, 1.0]


def test_string_answers_use_the_tokenizer():
    tok = make_tokenizer()
    logits = torch.randn(2, 3, VOCAB)
    pos = torch.tensor([2, 1])
    by_id = C.logit_diff(logits, [3, 4], [5, 6], pos)
    by_text = C.logit_diff(logits, ["w1", "w2"], ["w3", "w4"], pos, tokenizer=tok)
    assert torch.equal(by_id, by_text)


def test_estimate_matches_numpy():
    values = [0.5, 1.5, -2.0, 4.0, 3.25]
    est = C.Estimate.of(values)
    assert est.n == 5
    assert math.isclose(est.mean, np.mean(values))
    assert math.isclose(est.std, np.std(values, ddof=1))
    assert math.isclose(est.sem, np.std(values, ddof=1) / math.sqrt(5))
    one = C.Estimate.of([2.0])
    assert one.mean == 2.0 and math.isnan(one.std) and math.isnan(one.sem)
    scaled = est.normalized(clean=2.0, corrupted=-2.0)
    assert math.isclose(scaled.mean, (est.mean + 2) / 4) and math.isclose(scaled.std, est.std / 4)


def test_normalisation_endpoints_exact(model):
    task = random_task()
    for kind in ("logit_diff", "prob", "logprob", "kl"):
        result = C.score(model, task, kind)
        assert result.normalize(result.clean.mean) == 1.0
        assert result.normalize(result.corrupted.mean) == 0.0
        assert result.clean.normalized(result.clean.mean, result.corrupted.mean).mean == 1.0
        assert result.corrupted.normalized(result.clean.mean, result.corrupted.mean).mean == 0.0
    kl = C.score(model, task, "kl")
    assert kl.clean.mean == 0.0 and kl.corrupted.mean > 0


def test_score_matches_direct_computation(model):
    task = random_task(n_wrong=2)
    result = C.score(model, task, "logit_diff")
    with torch.no_grad():
        logits = model(task.clean_tokens)
    expected = C.logit_diff(logits, task.answers, task.wrong_answers, task.answer_pos)
    assert torch.allclose(result.clean.per_example, expected, atol=1e-6)
    assert result.clean.n == len(task)


# --- errors ------------------------------------------------------------------------------


def test_multi_token_answer_is_refused():
    tok = make_tokenizer()
    with pytest.raises(InterplabError, match="2 tokens"):
        C.answer_ids(["w1 w2"], tok)
    with pytest.raises(InterplabError, match="tokenizer="):
        C.answer_ids(["w1"])


def test_empty_dataset_is_refused(model):
    empty = random_task().select([])
    assert len(empty) == 0
    with pytest.raises(InterplabError, match="no examples"):
        C.score(model, empty)
    with pytest.raises(InterplabError, match="empty"):
        C.Estimate.of([])


def test_mismatched_lengths_are_refused():
    with pytest.raises(InterplabError, match="differ in shape"):
        C.metrics.check_pair(
            torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)
        )


def test_unknown_metric_and_degenerate_normalisation(model):
    task = random_task()
    with pytest.raises(InterplabError, match="unknown metric"):
        C.task_metric("logit_dif", task)
    with pytest.raises(InterplabError, match="clean_logits"):
        C.task_metric("kl", task)
    with pytest.raises(InterplabError, match="must be finite and different"):
        C.normalize(1.0, clean=2.0, corrupted=2.0)
    with pytest.raises(InterplabError, match="answer_pos"):
        C.answer_logits(torch.zeros(2, 3, 5), torch.tensor([0, 1, 2]))
