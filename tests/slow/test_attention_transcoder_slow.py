"""Attention transcoder teacher recovery at a larger size (seconds on an idle 2-core CPU).

Ground truth: 8 rank-1 heads on 2 causal patterns (d_model 16). A student with 16 heads on
2 groups and k = 8, trained from random QK and OV (ov_init="random", so the closed-form OV
fit does not do the work), must reproduce it almost exactly on held-out sequences.
"""

from __future__ import annotations

import pytest
import torch

from interplab.dictionaries.attention_transcoder import (
    AttentionTrainConfig,
    AttentionTranscoder,
    AttentionTranscoderConfig,
    fit_attention_transcoder,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("student_seed", [1, 5])
def test_two_group_teacher_is_recovered(student_seed):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = AttentionTranscoder(
        AttentionTranscoderConfig(n_heads=8, n_qk=2, k=8, d_head_qk=4, sink=False), 16
    )

    def pairs(seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(16, 12, 16, generator=g)
            with torch.no_grad():
                y = teacher.decode(teacher.encode(x))
            yield x, y

    torch.manual_seed(student_seed)
    student = AttentionTranscoder(
        AttentionTranscoderConfig(n_heads=16, n_qk=2, k=8, d_head_qk=4, sink=False), 16
    )
    train = AttentionTrainConfig(
        steps=600, lr=3e-2, progress=False, dead_tokens_threshold=10_000, ov_init="random"
    )
    fit_attention_transcoder(student, pairs(1), train)
    x, y = next(pairs(99))
    with torch.no_grad():
        assert float(student(x, y).fvu) < 1e-4
