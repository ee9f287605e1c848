"""Shared fixtures: small HF models and tokenizers built locally (no downloads)."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*bos_token_id must be.*")
warnings.filterwarnings("ignore", message=".*eos_token_id must be.*")

VOCAB = 100

# model_type -> config kwargs of a tiny random model of that family
FAMILIES: dict[str, dict] = {
    "gpt2": dict(n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=64),
    "gpt_neox": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rotary_pct=0.25,
    ),
    "llama": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    ),
    "qwen2": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    ),
    "gemma2": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    ),
}


def make_hf_model(family: str, seed: int = 0):
    """A tiny random HF causal LM of `family`, eval mode, eager attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **FAMILIES[family])
    config.bos_token_id = 0
    config.eos_token_id = 0
    config.pad_token_id = 0
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    # Random init leaves some biases and norm weights at 0/1; perturb them so the tests
    # would notice a missing bias or norm weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (
                "bias" in name
                or "norm" in name
                or name.endswith("ln_1.weight")
                or name.endswith("ln_2.weight")
            ):
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_tokenizer(words: list[str] | None = None, add_bos_in_post_processor: bool = False):
    """A word-level HF fast tokenizer with `<|endoftext|>` as BOS/EOS/PAD (id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = words or [f"w{i}" for i in range(VOCAB - 2)]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos_in_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
    )


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # Test tensors are tiny: one thread avoids OpenMP start-up costs (and contention).
    torch.set_num_threads(1)
