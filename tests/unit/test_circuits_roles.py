"""Head-role scores against closed forms: a hand-built GPT-2 whose layer-0 heads are a
previous-token head (score 1), a duplicate-token head (score 1/2 on [BOS] r r: the token's
first occurrence and itself tie) and a uniform head (closed-form averages of 1/(t+1)); every
score equals attention averages computed independently from `run_with_cache` patterns."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

import interplab as il
from interplab.circuits.metrics import Estimate
from interplab.circuits.roles import (
    DEFAULT_THRESHOLDS,
    TEXT_PREVIOUS,
    HeadScores,
    RoleScores,
    classify_heads,
    duplicate_token_attention,
    head_role_scores,
    induction_attention,
    previous_token_attention,
    repeated_sequences,
)
from interplab.errors import InterplabError

D_MODEL, N_HEADS, D_HEAD, N_POS, VOCAB = 128, 4, 32, 32, 32
SEQ_LEN = 7  # [BOS] r r: 15 positions


def hand_built_gpt2():
    """Layer 0: positions live in dims 0..63 and tokens in dims 64..127, each as
    a * (e_2i - e_2i+1) with a = sqrt(32), so every embedded row has mean 0 and variance 1
    and LayerNorm (weight 1, bias 0) leaves it unchanged. Head 0's query at position t is
    c * u_{t-1} and its key at s is u_s (previous-token); head 1's query and key are the
    token's one-hot u_token (duplicate-token); head 2 has zero queries (uniform attention);
    head 3 and layer 1 keep their random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=D_MODEL, n_head=N_HEADS, n_layer=2, vocab_size=VOCAB, n_positions=N_POS
    )
    hf = GPT2LMHeadModel(config).eval()
    a, c = math.sqrt(32), 60.0 * math.sqrt(D_HEAD)  # c: a 60-logit margin after 1/sqrt(d_head)

    def pair(dim: int) -> torch.Tensor:
        v = torch.zeros(D_MODEL)
        v[dim], v[dim + 1] = 1.0, -1.0
        return v

    with torch.no_grad():
        hf.transformer.wpe.weight.copy_(torch.stack([a * pair(2 * t) for t in range(N_POS)]))
        hf.transformer.wte.weight.copy_(torch.stack([a * pair(64 + 2 * v) for v in range(VOCAB)]))
        block = hf.transformer.h[0]
        block.ln_1.weight.fill_(1.0)
        block.ln_1.bias.zero_()
        W, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # [d_model, 3 d_model]
        q, k = slice(0, D_MODEL), slice(D_MODEL, 2 * D_MODEL)
        W[:, q][:, : 3 * D_HEAD] = 0.0
        W[:, k][:, : 3 * D_HEAD] = 0.0
        b[: 3 * D_HEAD] = 0.0
        b[D_MODEL : D_MODEL + 3 * D_HEAD] = 0.0
        for j in range(D_HEAD):
            if j + 1 < N_POS:  # head 0: position t queries for t - 1
                W[:, j] = c / (2 * a) * pair(2 * (j + 1))
            W[:, D_MODEL + j] = pair(2 * j) / (2 * a)
            W[:, D_HEAD + j] = c / (2 * a) * pair(64 + 2 * j)  # head 1: same token
            W[:, D_MODEL + D_HEAD + j] = pair(64 + 2 * j) / (2 * a)
    return il.load_model(hf, device="cpu")


@pytest.fixture(scope="module")
def model():
    return hand_built_gpt2()


def repeats(n=6, seq_len=SEQ_LEN, seed=0):
    """[BOS=0] r r with r distinct tokens from 1..VOCAB-1."""
    g = torch.Generator().manual_seed(seed)
    r = torch.stack([torch.randperm(VOCAB - 1, generator=g)[:seq_len] + 1 for _ in range(n)])
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), r, r], dim=1)


def patterns(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    return [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]


def reference_scores(model, tokens, seq_len):
    """Per (layer, head, sequence) averages with explicit loops over positions."""
    pats = patterns(model, tokens)
    n, T = tokens.shape
    p = T - 2 * seq_len
    out = {r: torch.zeros(len(pats), N_HEADS, n) for r in ("prev", "ind", "dup")}
    for layer, pat in enumerate(pats):
        for h in range(N_HEADS):
            for b in range(n):
                prev = [float(pat[b, h, t, t - 1]) for t in range(2, T)]
                ind = [float(pat[b, h, p + seq_len + i, p + i + 1]) for i in range(seq_len - 1)]
                dup = [float(pat[b, h, p + seq_len + i, p + i]) for i in range(seq_len)]
                out["prev"][layer, h, b] = sum(prev) / len(prev)
                out["ind"][layer, h, b] = sum(ind) / len(ind)
                out["dup"][layer, h, b] = sum(dup) / len(dup)
    return out


def test_forced_heads_match_closed_forms(model):
    tokens = repeats()
    scores = head_role_scores(model, tokens, batch_size=4)
    assert scores.seq_len == SEQ_LEN and scores.n == 6 and scores.shape == (2, N_HEADS)
    T = tokens.shape[1]
    # head 0: previous-token, exactly
    assert scores["previous-token"].mean[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert scores["induction"].mean[0, 0] == pytest.approx(0.0, abs=1e-5)
    # head 1: the second copy's token ties between its first occurrence and itself
    assert scores["duplicate-token"].mean[0, 1] == pytest.approx(0.5, abs=1e-5)
    assert scores["previous-token"].mean[0, 1] == pytest.approx(0.0, abs=1e-5)
    # head 2: uniform causal attention: 1 / (t + 1) at destination t
    uniform_prev = sum(1 / (t + 1) for t in range(2, T)) / (T - 2)
    uniform_ind = sum(1 / (1 + SEQ_LEN + i + 1) for i in range(SEQ_LEN - 1)) / (SEQ_LEN - 1)
    uniform_dup = sum(1 / (1 + SEQ_LEN + i + 1) for i in range(SEQ_LEN)) / SEQ_LEN
    assert scores["previous-token"].mean[0, 2] == pytest.approx(uniform_prev, abs=1e-5)
    assert scores["induction"].mean[0, 2] == pytest.approx(uniform_ind, abs=1e-5)
    assert scores["duplicate-token"].mean[0, 2] == pytest.approx(uniform_dup, abs=1e-5)
    # forced heads do the same on every sequence: no spread
    assert scores["previous-token"].std[0, 0] < 1e-5


def test_scores_equal_cache_averages_with_spread(model):
    tokens = repeats(n=5, seed=1)
    text = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    scores = head_role_scores(model, tokens, text, batch_size=2)
    ref = reference_scores(model, tokens, SEQ_LEN)
    for role, key in (("previous-token", "prev"), ("induction", "ind"), ("duplicate-token", "dup")):
        s = scores[role]
        torch.testing.assert_close(s.per_example, ref[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(s.mean, ref[key].mean(-1), atol=1e-6, rtol=0)
        torch.testing.assert_close(s.std, ref[key].std(-1), atol=1e-6, rtol=0)
        torch.testing.assert_close(s.sem, ref[key].std(-1) / math.sqrt(5), atol=1e-6, rtol=0)
    # random heads are not trivially 0 or 1: the comparison above is informative
    assert 0.01 < float(scores["previous-token"].mean[1, 3]) < 0.99
    text_ref = torch.stack(
        [
            torch.stack(
                [
                    pat[:, h, torch.arange(2, 12), torch.arange(1, 11)].mean(-1)
                    for h in range(N_HEADS)
                ]
            )
            for pat in patterns(model, text)
        ]
    )
    torch.testing.assert_close(scores[TEXT_PREVIOUS].per_example, text_ref, atol=1e-6, rtol=0)
    assert scores.n_text == 3
    e = scores["induction"].estimate(1, 2)
    assert isinstance(e, Estimate) and e.n == 5
    assert e.mean == pytest.approx(float(ref["ind"][1, 2].mean()), abs=1e-6)


def test_closed_forms_on_synthetic_patterns():
    L, p = 4, 1
    T = p + 2 * L
    pattern = torch.zeros(2, 3, T, T)
    pattern[..., 0, 0] = 1.0
    for t in range(1, T):
        pattern[0, 0, t, t - 1] = 1.0  # previous-token
        pattern[0, 2, t, 0] = 1.0  # all on BOS
    for t in range(1, p + L):
        pattern[0, 1, t, t] = 1.0
    for i in range(L):
        dst = p + L + i
        if i < L - 1:
            pattern[0, 1, dst, p + i + 1] = 0.75  # induction 3/4, duplicate 1/4
            pattern[0, 1, dst, p + i] = 0.25
        else:
            pattern[0, 1, dst, p + i] = 1.0  # the last token has no i+1 to look at
    pattern[1] = pattern[0].flip(0)
    prev = previous_token_attention(pattern)
    ind = induction_attention(pattern, L)
    dup = duplicate_token_attention(pattern, L)
    assert prev[0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert ind[0].tolist() == pytest.approx([0.0, 0.75, 0.0])
    assert dup[0].tolist() == pytest.approx([0.0, (3 * 0.25 + 1.0) / L, 0.0])
    assert ind[1].tolist() == pytest.approx(ind[0].flip(0).tolist())


def role_scores(means: dict[str, list[list[float]]]) -> RoleScores:
    scores = {
        role: HeadScores.of(role, torch.tensor(m)[..., None].expand(-1, -1, 3).clone())
        for role, m in means.items()
    }
    return RoleScores(scores, seq_len=10, n=3)


def test_classify_heads_thresholds_and_ties():
    scores = role_scores(
        {
            "previous-token": [[0.9, 0.25, 0.1], [0.05, 0.0, 0.0]],
            "induction": [[0.0, 0.35, 0.1], [0.31, 0.0, 0.29]],
            "duplicate-token": [[0.0, 0.0, 0.1], [0.6, 0.0, 0.0]],
        }
    )
    roles = classify_heads(scores)
    # L0H1 passes both previous-token (0.25 / 0.2 = 1.25) and induction (0.35 / 0.3 = 1.17)
    assert roles.roles == [
        ["previous-token", "previous-token", "none"],
        ["duplicate-token", "none", "none"],
    ]
    assert roles.labels("previous-token") == ["L0H0", "L0H1"]
    assert roles.to_dict() == {
        "previous-token": ["L0H0", "L0H1"],
        "induction": [],
        "duplicate-token": ["L1H0"],
    }
    only = classify_heads(scores, {"induction": 0.29})
    assert only.labels("induction") == ["L0H1", "L1H0", "L1H2"]
    assert only.thresholds == {"induction": 0.29}
    assert DEFAULT_THRESHOLDS == {"previous-token": 0.2, "induction": 0.3, "duplicate-token": 0.3}


def test_classify_forced_model(model):
    roles = classify_heads(head_role_scores(model, repeats()))
    assert roles.roles[0][:2] == ["previous-token", "duplicate-token"]
    assert roles.roles[0][2] == "none"


def test_bad_inputs(model):
    scores = role_scores({"induction": [[0.5]]})
    with pytest.raises(InterplabError, match="unknown head role 'inductoin'"):
        classify_heads(scores, {"inductoin": 0.3})
    with pytest.raises(InterplabError, match=r"in \(0, 1\]"):
        classify_heads(scores, {"induction": 1.5})
    with pytest.raises(InterplabError, match="no 'previous-token' score"):
        classify_heads(scores, {"previous-token": 0.3})
    with pytest.raises(InterplabError, match="thresholds is empty"):
        classify_heads(scores, {})
    with pytest.raises(InterplabError, match="unknown role score"):
        scores["copying"]
    tokens = repeats()
    broken = tokens.clone()
    broken[2, -1] = (broken[2, -1] % (VOCAB - 1)) + 1
    with pytest.raises(InterplabError, match="row 2 is not"):
        head_role_scores(model, broken)
    with pytest.raises(InterplabError, match="seq_len=9 does not fit"):
        head_role_scores(model, tokens, seq_len=9)
    with pytest.raises(InterplabError, match="integer tensor"):
        head_role_scores(model, tokens.float())
    with pytest.raises(InterplabError, match="batch_size"):
        head_role_scores(model, tokens, batch_size=0)
    with pytest.raises(InterplabError, match="seq_len must be an int >= 2"):
        repeated_sequences(model, n=4, seq_len=1)
    with pytest.raises(InterplabError, match="at least 3 positions"):
        previous_token_attention(torch.ones(1, 1, 2, 2))


def test_repeated_sequences_and_plot(model):
    # no tokenizer (so no BOS): r r over the whole vocabulary
    tokens = repeated_sequences(il.load_model(il.models.ToyConfig(n_layers=1, d_vocab=50)), 3, 5)
    assert tokens.shape == (3, 10)
    assert torch.equal(tokens[:, :5], tokens[:, 5:])
    fig = head_role_scores(model, repeats()).plot(["induction", "previous-token"])
    assert len(fig.axes) == 4  # two heatmaps and their colour bars
