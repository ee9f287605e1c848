"""How each bundled model organism is made: its corpus, tokenizer, shape and training run.

    interplab train-organism storyworld-4l            # trains into models/organisms/storyworld-4l
    interplab train-organism storyworld-2l --out /tmp/sw2l --steps 200   # a quick variant

Every storyworld organism shares one tokenizer (BPE built from the first 2,000 training
documents, seed 0), is trained on the `train` split of storyworld with the organism's own
seed, and is evaluated (held-out loss) on documents of another seed. The scorecard
(`interplab.data.tasks.scorecard`, held-out phrasings) is computed on the saved weights and
written into card.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from interplab.errors import InterplabError, unknown

ROOT = Path(__file__).parent


@dataclass
class OrganismSpec:
    """The recipe of one organism."""

    name: str
    description: str
    corpus: Literal["storyworld", "python-stdlib"]
    model: dict[str, Any]
    """LMConfig fields (vocab_size is set from the tokenizer)."""
    train: dict[str, Any]
    """TrainLMConfig fields."""
    seed: int = 0
    """Seed of the initialisation, the batch order and the training documents."""
    base: str | None = None
    """For fine-tuned organisms: the organism they start from."""
    phenomena: list[str] | None = None
    """Scorecard phenomena (None = all storyworld phenomena)."""
    mix: dict[str, float] | None = None
    """Storyworld phenomenon weights (None = `default_mix()`)."""
    repeat_windows: float = 0.0
    """Fraction of training windows replaced by chains of repeated random words
    (`repeat_windows`); 0 = plain storyworld."""
    extra: dict[str, Any] = field(default_factory=dict)


_CTX = 128
# The 2-layer organisms tie W_U = W_E^T (as GPT-2 does) and see 30% of their windows as chains
# of repeated words: without both, no 2-layer run formed induction heads within 3,000 steps
# (see `repeat_windows` and the README's organism history).
_SW2L = dict(
    architecture="gpt2", n_layers=2, d_model=128, n_heads=4, n_ctx=_CTX, tie_embeddings=True
)
_SW2L_REPEATS = 0.3
_SW2L_TRAIN = dict(
    steps=4000, batch_size=32, lr=2e-3, warmup_steps=100, eval_every=500, checkpoint_every=250
)
_SW1L_TRAIN = dict(
    steps=2500, batch_size=32, lr=2e-3, warmup_steps=100, eval_every=500, checkpoint_every=250
)

SUITE: dict[str, OrganismSpec] = {
    "storyworld-1l-attn": OrganismSpec(
        "storyworld-1l-attn",
        "1-layer attention-only GPT-2 (d_model 128, 4 heads) on storyworld: skip-trigrams only",
        "storyworld",
        dict(architecture="gpt2", n_layers=1, d_model=128, n_heads=4, n_ctx=_CTX, attn_only=True),
        dict(_SW1L_TRAIN),
    ),
    "storyworld-2l": OrganismSpec(
        "storyworld-2l",
        "2-layer GPT-2 (d_model 128, 4 heads, d_mlp 512, tied embeddings) on storyworld with "
        "30% repeated-word windows",
        "storyworld",
        dict(_SW2L),
        dict(_SW2L_TRAIN),
        repeat_windows=_SW2L_REPEATS,
    ),
    **{
        f"storyworld-2l-seed{s}": OrganismSpec(
            f"storyworld-2l-seed{s}",
            f"storyworld-2l retrained with seed {s} (same recipe; for universality studies)",
            "storyworld",
            dict(_SW2L),
            dict(_SW2L_TRAIN),
            seed=s,
            repeat_windows=_SW2L_REPEATS,
        )
        for s in range(1, 5)
    },
    "storyworld-4l": OrganismSpec(
        "storyworld-4l",
        "4-layer GPT-2 (d_model 128, 4 heads, d_mlp 512) on storyworld",
        "storyworld",
        dict(architecture="gpt2", n_layers=4, d_model=128, n_heads=4, n_ctx=_CTX),
        dict(
            steps=4000,
            batch_size=32,
            lr=2e-3,
            warmup_steps=150,
            eval_every=500,
            checkpoint_every=250,
        ),
    ),
    "storyworld-4l-noln": OrganismSpec(
        "storyworld-4l-noln",
        "storyworld-4l with every LayerNorm removed by fine-tuning (fixed scale, mean-centring only)",
        "storyworld",
        dict(architecture="gpt2", n_layers=4, d_model=128, n_heads=4, n_ctx=_CTX),
        dict(
            steps=800, batch_size=32, lr=3e-4, warmup_steps=20, eval_every=200, checkpoint_every=100
        ),
        seed=20_000,
        base="storyworld-4l",
        extra={"removal_gap": 50, "removal_first_step": 25},
    ),
    "code-4l": OrganismSpec(
        "code-4l",
        "4-layer GPT-2 (d_model 128, 4 heads) on the Python standard library",
        "python-stdlib",
        dict(architecture="gpt2", n_layers=4, d_model=128, n_heads=4, n_ctx=_CTX),
        dict(
            steps=2500,
            batch_size=32,
            lr=2e-3,
            warmup_steps=150,
            eval_every=500,
            checkpoint_every=250,
        ),
        phenomena=["code_brackets", "code_quotes", "induction"],
    ),
}


def organism_spec(name: str) -> OrganismSpec:
    if name not in SUITE:
        raise unknown("organism recipe", name, SUITE, show_all=True)
    return SUITE[name]


def _tokenizer(spec: OrganismSpec) -> Any:
    from interplab.data.corpus import tokenizer as tok

    if spec.corpus == "storyworld":
        return tok.to_hf_tokenizer(tok.storyworld_tokenizer(n_docs=2000, vocab_size=4096, seed=0))
    return tok.to_hf_tokenizer(tok.code_tokenizer(vocab_size=4096, seed=0))


def _corpus(spec: OrganismSpec, seed: int) -> Any:
    from interplab.data.corpus import PythonSourceCorpus
    from interplab.data.corpus.storyworld import StoryworldConfig, StoryworldCorpus

    if spec.corpus == "storyworld":
        if spec.mix is None:
            return StoryworldCorpus(StoryworldConfig(seed=seed, split="train"))
        return StoryworldCorpus(StoryworldConfig(seed=seed, split="train", mix=dict(spec.mix)))
    return PythonSourceCorpus()


def train_organism(
    name: str | OrganismSpec,
    out: str | Path | None = None,
    *,
    steps: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train organism `name` (see SUITE) into `out` (default: the bundled folder), score it and
    write card.json. Resumes from checkpoints in `out`. Returns the output folder."""
    from interplab.data.corpus import pack
    from interplab.models.train_lm import LMConfig, TrainLMConfig, train_lm

    spec = name if isinstance(name, OrganismSpec) else organism_spec(name)
    name = spec.name
    out_dir = Path(out) if out is not None else ROOT / name
    train_fields = dict(spec.train, seed=spec.seed, device=device, progress=progress)
    if steps is not None:
        train_fields.update(steps=steps, warmup_steps=min(spec.train["warmup_steps"], steps // 10))
    train_config = TrainLMConfig(**train_fields)

    tokenizer = _tokenizer(spec)
    model_config = LMConfig(**spec.model, vocab_size=len(tokenizer))
    n_ctx = model_config.n_ctx
    start = time.perf_counter()
    n_train = train_config.steps * train_config.batch_size
    if spec.corpus == "python-stdlib":  # a finite corpus: hold out its last windows
        both = pack(
            _corpus(spec, 0), tokenizer, n_ctx, _max_windows(spec, tokenizer, n_ctx), seed=0
        )
        n_eval = max(64, both.ids.shape[0] // 50)
        train_ids, eval_ids = both.ids[:-n_eval], both.ids[-n_eval:]
        corpus_id, corpus_hash = both.corpus_id, both.content_hash
    else:
        train = pack(_corpus(spec, spec.seed), tokenizer, n_ctx, n_train, seed=spec.seed)
        held = pack(
            _corpus(spec, 10_000 + spec.seed), tokenizer, n_ctx, 512, seed=10_000 + spec.seed
        )
        train_ids, eval_ids = train.ids, held.ids
        corpus_id, corpus_hash = train.corpus_id, train.content_hash
        if spec.repeat_windows > 0:
            from interplab.data.corpus import tokens_hash

            train_ids = repeat_windows(train_ids, tokenizer, spec.repeat_windows, spec.seed)
            corpus_id = f"{corpus_id}+repeats{spec.repeat_windows:g}"
            corpus_hash = tokens_hash(train_ids)
    data_seconds = time.perf_counter() - start

    card_extra = {
        "name": name,
        "description": spec.description,
        "corpus": spec.corpus,
        "corpus_id": corpus_id,
        "corpus_hash": corpus_hash,
        "data_seconds": round(data_seconds, 1),
        "command": f"interplab train-organism {name}",
    }
    if spec.base is not None:
        from interplab.models.organisms import organism_path
        from interplab.models.remove_layernorm import RemoveLayerNormConfig, remove_layernorm

        card_extra["base"] = spec.base
        removal = RemoveLayerNormConfig(
            first_step=spec.extra["removal_first_step"], gap=spec.extra["removal_gap"]
        )
        remove_layernorm(
            organism_path(spec.base),
            train_config,
            train_ids,
            eval_ids,
            out_dir,
            removal,
            card_extra=card_extra,
        )
        write_scorecard(out_dir, name, spec.phenomena)
        return out_dir
    result = train_lm(
        model_config,
        train_config,
        train_ids,
        eval_ids,
        out_dir,
        tokenizer=tokenizer,
        card_extra=card_extra,
    )
    write_scorecard(out_dir, name, spec.phenomena)
    return result.out_dir


def repeat_windows(ids: Any, tokenizer: Any, fraction: float, seed: int) -> Any:
    """`ids` with a seeded `fraction` of its windows replaced by [BOS] r1 r1 r2 r2 ...: spans
    r of 4 to (width - 1) // 2 words drawn uniformly from the single-token induction words,
    each followed by its copy (cut at the window's end).

    For experiments on when induction forms: on windows made only of such chains a 2-layer
    GPT-2 (d_model 128) learns induction within ~300 steps, while in plain storyworld
    (about 5% of tokens are predictable second copies) storyworld-2l had not after 3,000
    steps; replacing 20% of the windows by chains (with tied embeddings) did not change that
    within 1,500 steps. No bundled organism uses it yet.
    """
    import numpy as np
    import torch

    from interplab.data.corpus.storyworld_vocab import INDUCTION_WORDS

    if not 0 < fraction < 1:
        raise InterplabError(f"repeat_windows must be in (0, 1), got {fraction!r}.")
    pool = []
    for word in INDUCTION_WORDS:
        token = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(token) == 1:
            pool.append(token[0])
    out = torch.as_tensor(np.asarray(ids)).clone()
    n, width = out.shape
    rng = np.random.default_rng([seed, 7_777])
    chosen = rng.choice(n, size=int(round(fraction * n)), replace=False)
    for row in chosen:
        tokens = [int(out[row, 0])]  # keep the window's BOS
        while len(tokens) < width:
            span = list(rng.choice(pool, size=int(rng.integers(4, (width - 1) // 2 + 1))))
            tokens += span + span
        out[row] = torch.tensor(tokens[:width])
    return out


def _max_windows(spec: OrganismSpec, tokenizer: Any, n_ctx: int) -> int:
    """How many full windows the finite corpus gives."""
    total = 0
    eos = 1
    for document in _corpus(spec, 0).documents(0):
        total += len(tokenizer.encode(document, add_special_tokens=False)) + eos
    return total // (n_ctx - 1)


def write_scorecard(
    folder: str | Path, name: str, phenomena: list[str] | None = None, n: int = 256
) -> Any:
    """Score the model in `folder` and merge the scorecard into its card.json."""
    import json

    from interplab.data.tasks.scorecard import scorecard
    from interplab.models.loading import load_model
    from interplab.runs import atomic_write_json

    folder = Path(folder)
    model = load_model(folder, device="cpu")
    card_path = folder / "card.json"
    card = json.loads(card_path.read_text())
    card["scorecard"] = scorecard(model, phenomena, n=n, name=name).to_dict()
    atomic_write_json(card_path, card)
    return card["scorecard"]


def spec_with(name: str, **changes: Any) -> OrganismSpec:
    """A copy of a spec with fields replaced (for experiments and tests)."""
    return replace(organism_spec(name), **changes)
