"""Attention superposition: skip-trigram tasks with more features than heads.

Background: Anthropic, "Circuits Updates — May 2023" (Jermyn, Olah, Henighan: attention
head superposition) and "— July 2023" (the two-head construction), and Jermyn et al.'s
follow-up posts (e.g. "An OV-coherent toy model of attention head superposition", 2023).

A skip-trigram feature f is a triple (a_f, b_f, c_f): when source token a_f occurs anywhere
earlier in the context and destination token b_f is the current token, predict c_f. A
one-layer attention-only transformer implements a skip-trigram with a head whose QK circuit
makes b_f attend to a_f and whose OV circuit maps a_f to c_f. With more features than heads,
no head can be dedicated to each, and the features share heads. Two settings:

- "ov_incoherent": one source token A shared by every feature, many destinations B_f.
  A head that attends to A writes the same vector OV(A) whatever the destination, so it
  cannot output c_f for destination B_f and c_g for B_g by itself: the answer is built by
  several paths (the direct path of B_f, heads that attend to A, heads that cancel them).
- "ov_coherent": many sources A_f and one destination B. The head's OV output is a
  function of the source it reads, but with small `d_head` one head's rank-d_head OV
  circuit cannot map many sources onto many distinct outputs, so the map is split
  across heads.

The data (`SkipTrigramTask.sample`): `seq_len - 1` context tokens drawn uniformly from
filler tokens, then the destination token. With probability `p_complete` the feature's
source replaces one uniformly chosen context token and the answer is c_f; otherwise no
matching source is present and the answer is a NULL token. Without these negatives the
direct path (destination -> answer bigram) would solve the task and attention would be
unused. The loss is cross-entropy over the answer tokens (c_0 .. c_{n-1}, NULL) at the
last position only.

The model is a one-layer, attention-only, normalisation-free transformer with learned
positions, in TransformerLens parameter shapes (`AttentionWeights`). Many instances
(seeds) train at once with a leading instance axis; the forward pass computes only the
last position (`last_position_forward`), which equals the native TransformerLens model's
output there (`AttentionSuperpositionResult.to_model(i)` builds that model, with every
hook name, from the trained weights; tested). Training is this file's own small loop, not
the bridge's hooked forward, because the hooked forward costs more per step than the whole
toy model and importing TransformerLens takes seconds.

Analysis (`analyse_features`): per feature f, on examples where its trigram is complete,
the direct logit attribution (DLA) of each head to c_f's centred logit (logit of c_f minus
the mean over answers), which with the direct path and the biases sums to that logit
exactly; from it a features x heads heatmap, the participation ratio (how many heads a
feature uses) and a count of heads that each carry a share of it; per-feature accuracy;
and interference: the QK circuit's preference for the source over fillers per (feature,
head), the attention each head pays to the true source, and the OV circuit's logit for
other features' answers when it reads f's source.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.errors import InterplabError, unknown
from interplab.toys.superposition import _Adam

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

Setting = Literal["ov_incoherent", "ov_coherent"]
LrSchedule = Literal["constant", "cosine"]


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InterplabError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_float(name: str, value: Any, low: float, high: float, *, open_low: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise InterplabError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}.")


# --------------------------------------------------------------------------------------
# Task: vocabulary layout and the data generator
# --------------------------------------------------------------------------------------


@dataclass
class SkipTrigramBatch:
    """Sequences with planted skip-trigrams; the answer is due at the last position."""

    tokens: Int[Tensor, "batch pos"]
    """Token ids; the last one is a destination token."""
    answer: Int[Tensor, " batch"]
    """Index into `SkipTrigramTask.answer_tokens`: f for feature f's output c_f, n_features
    for NULL."""
    feature: Int[Tensor, " batch"]
    """The feature drawn for the example; -1 where nothing identifies a feature (an
    incomplete example of the "ov_coherent" setting, whose one destination is shared)."""
    complete: Bool[Tensor, " batch"]
    """Whether the feature's source is in the context (the trigram is complete)."""
    source_pos: Int[Tensor, " batch"]
    """Position of the source token; -1 when incomplete."""


@dataclass
class SkipTrigramTask:
    """A skip-trigram task with `n_features` features (a_f, b_f, c_f) in one of two settings.

    Vocabulary: filler tokens, then source tokens, destination tokens, output tokens c_f and
    a NULL answer (ids in that order; see the `*_tokens` properties).
    """

    setting: Setting = "ov_incoherent"
    """"ov_incoherent": one source token, one destination per feature (Anthropic, May 2023);
    "ov_coherent": one source per feature, one destination."""
    n_features: int = 12
    """Number of skip-trigram features (distinct answers c_f)."""
    n_filler: int = 16
    """Filler tokens that fill the context."""
    seq_len: int = 10
    """Tokens per sequence (context plus the destination at the end)."""
    p_complete: float = 0.5
    """Chance that the feature's source is present (else the answer is NULL)."""
    feature_decay: float = 1.0
    """Feature f is drawn with probability proportional to feature_decay ** f (1 = uniform;
    below 1 later features are rarer, like the importance decay of Elhage et al. 2022)."""

    def __post_init__(self) -> None:
        if self.setting not in get_args(Setting):
            raise unknown("setting", str(self.setting), get_args(Setting), show_all=True)
        _check_int("n_features", self.n_features, 2)
        _check_int("n_filler", self.n_filler, 1)
        _check_int("seq_len", self.seq_len, 2)
        _check_float("p_complete", self.p_complete, 0.0, 1.0, open_low=False)
        _check_float("feature_decay", self.feature_decay, 0.0, 1.0, open_low=True)

    # ---------------------------------------------------------------- vocabulary layout
    @property
    def n_sources(self) -> int:
        """Distinct source tokens: 1 (ov_incoherent) or n_features (ov_coherent)."""
        return 1 if self.setting == "ov_incoherent" else self.n_features

    @property
    def n_destinations(self) -> int:
        """Distinct destination tokens: n_features (ov_incoherent) or 1 (ov_coherent)."""
        return self.n_features if self.setting == "ov_incoherent" else 1

    @property
    def filler_tokens(self) -> Int[Tensor, " n_filler"]:
        """Ids of the filler tokens."""
        return torch.arange(self.n_filler)

    @property
    def source_tokens(self) -> Int[Tensor, " n_sources"]:
        """Ids of the source tokens."""
        return torch.arange(self.n_sources) + self.n_filler

    @property
    def destination_tokens(self) -> Int[Tensor, " n_destinations"]:
        """Ids of the destination tokens."""
        return torch.arange(self.n_destinations) + self.n_filler + self.n_sources

    @property
    def answer_tokens(self) -> Int[Tensor, " answers"]:
        """Ids of the answers: output tokens c_0 .. c_{n-1}, then NULL."""
        start = self.n_filler + self.n_sources + self.n_destinations
        return torch.arange(self.n_features + 1) + start

    @property
    def null_token(self) -> int:
        """Id of the NULL answer (no trigram completed)."""
        return int(self.answer_tokens[-1])

    @property
    def d_vocab(self) -> int:
        """Vocabulary size."""
        return self.null_token + 1

    @property
    def features(self) -> Int[Tensor, "n_features 3"]:
        """Token ids (a_f, b_f, c_f) of every feature."""
        f = torch.arange(self.n_features)
        a = self.source_tokens[f % self.n_sources]  # one shared source, or one per feature
        b = self.destination_tokens[f % self.n_destinations]
        return torch.stack([a, b, self.answer_tokens[f]], dim=1)

    def feature_probabilities(self) -> Float[Tensor, " n_features"]:
        """Probability of drawing each feature (proportional to feature_decay ** f)."""
        w = self.feature_decay ** torch.arange(self.n_features, dtype=torch.float64)
        return (w / w.sum()).float()

    # ---------------------------------------------------------------- generator
    def sample(
        self,
        n: int,
        generator: torch.Generator | int = 0,
        *,
        feature: int | Tensor | None = None,
        complete: bool | None = None,
    ) -> SkipTrigramBatch:
        """Draw `n` sequences (see the module docstring for the distribution).

        `generator` is a torch.Generator or a seed. `feature` fixes the feature of every
        example (an int, or one per example); `complete` fixes whether the source is
        present. Positions of the source are uniform over the context.
        """
        _check_int("n", n)
        gen = generator if isinstance(generator, torch.Generator) else _generator(generator)
        L, nf = self.seq_len, self.n_features
        if feature is None:
            feat = torch.multinomial(self.feature_probabilities(), n, True, generator=gen)
        else:
            feat = torch.as_tensor(feature, dtype=torch.long)
            if feat.ndim > 1 or (feat.ndim == 1 and feat.shape[0] != n):
                raise InterplabError(
                    f"feature must be an int or one per example ([{n}]), got shape "
                    f"{list(feat.shape)}."
                )
            feat = feat.expand(n).clone()
            if bool(((feat < 0) | (feat >= nf)).any()):
                raise InterplabError(f"feature must lie in [0, {nf}), got {feature!r}.")
        if complete is None:
            done = torch.rand(n, generator=gen) < self.p_complete
        else:
            done = torch.full((n,), bool(complete))
        context = torch.randint(0, self.n_filler, (n, L - 1), generator=gen)
        pos = torch.randint(0, L - 1, (n,), generator=gen)
        table = self.features
        rows = torch.arange(n)
        context[rows[done], pos[done]] = table[feat[done], 0]
        tokens = torch.cat([context, table[feat, 1][:, None]], dim=1)
        answer = torch.where(done, feat, torch.full_like(feat, nf))
        shown = feat if self.setting == "ov_incoherent" else torch.where(done, feat, -1)
        return SkipTrigramBatch(
            tokens=tokens,
            answer=answer,
            feature=shown,
            complete=done,
            source_pos=torch.where(done, pos, -1),
        )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# --------------------------------------------------------------------------------------
# Model: weights in TransformerLens shapes and a last-position forward
# --------------------------------------------------------------------------------------


@dataclass
class AttentionWeights:
    """A one-layer, attention-only model without normalisation, TransformerLens shapes.

    Every tensor has leading `*instances` axes (none for a single model): q = x W_Q + b_Q,
    z = pattern v, out = Σ_h z_h W_O[h] + b_O, logits = (x + out) W_U + b_U.
    """

    W_E: Float[Tensor, "*instances d_vocab d_model"]
    """Token embedding."""
    W_pos: Float[Tensor, "*instances n_ctx d_model"]
    """Learned position embedding."""
    W_Q: Float[Tensor, "*instances n_heads d_model d_head"]
    """Query weights per head."""
    W_K: Float[Tensor, "*instances n_heads d_model d_head"]
    """Key weights per head."""
    W_V: Float[Tensor, "*instances n_heads d_model d_head"]
    """Value weights per head."""
    W_O: Float[Tensor, "*instances n_heads d_head d_model"]
    """Output weights per head (z_h W_O[h] is head h's write to the residual stream)."""
    b_Q: Float[Tensor, "*instances n_heads d_head"]
    """Query bias."""
    b_K: Float[Tensor, "*instances n_heads d_head"]
    """Key bias."""
    b_V: Float[Tensor, "*instances n_heads d_head"]
    """Value bias."""
    b_O: Float[Tensor, "*instances d_model"]
    """Attention output bias."""
    W_U: Float[Tensor, "*instances d_model d_vocab"]
    """Unembedding."""
    b_U: Float[Tensor, "*instances d_vocab"]
    """Unembedding bias."""

    def tensors(self) -> list[Tensor]:
        """The parameters, in field order."""
        return [getattr(self, f.name) for f in fields(self)]

    def instance(self, i: int) -> AttentionWeights:
        """The weights of instance `i` (drops the leading instance axis)."""
        return AttentionWeights(*(t[i] for t in self.tensors()))

    def map(self, fn: Any) -> AttentionWeights:
        """A copy with `fn` applied to every tensor (e.g. `lambda t: t.detach().cpu()`)."""
        return AttentionWeights(*(fn(t) for t in self.tensors()))

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[-3]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[-1]


def init_weights(
    n_instances: int,
    d_vocab: int,
    n_ctx: int,
    d_model: int,
    n_heads: int,
    d_head: int,
    generator: torch.Generator,
) -> AttentionWeights:
    """Random initial weights [n_instances, ...]: normal with std 1/sqrt(fan_in) (embeddings
    std 1/sqrt(d_model), so residual vectors start near unit norm), biases 0."""
    n_i, H = n_instances, n_heads

    def normal(*shape: int, fan_in: int) -> Tensor:
        return torch.randn(n_i, *shape, generator=generator) / math.sqrt(fan_in)

    return AttentionWeights(
        W_E=normal(d_vocab, d_model, fan_in=d_model),
        W_pos=normal(n_ctx, d_model, fan_in=d_model),
        W_Q=normal(H, d_model, d_head, fan_in=d_model),
        W_K=normal(H, d_model, d_head, fan_in=d_model),
        W_V=normal(H, d_model, d_head, fan_in=d_model),
        W_O=normal(H, d_head, d_model, fan_in=H * d_head),
        b_Q=torch.zeros(n_i, H, d_head),
        b_K=torch.zeros(n_i, H, d_head),
        b_V=torch.zeros(n_i, H, d_head),
        b_O=torch.zeros(n_i, d_model),
        W_U=normal(d_model, d_vocab, fan_in=d_model),
        b_U=torch.zeros(n_i, d_vocab),
    )


@dataclass
class LastPosition:
    """The pieces of the forward pass at the last position, per instance and example."""

    logits: Float[Tensor, "instances batch d_vocab"]
    """Output logits."""
    pattern: Float[Tensor, "instances batch n_heads pos"]
    """Attention of the last position to every position (hook_pattern[..., -1, :])."""
    z: Float[Tensor, "instances batch n_heads d_head"]
    """Each head's mixed values (hook_z at the last position)."""
    direct: Float[Tensor, "instances batch d_model"]
    """The residual stream before attention: token plus position embedding."""

    def head_out(
        self, weights: AttentionWeights
    ) -> Float[Tensor, "instances batch n_heads d_model"]:
        """Each head's output z_h W_O[h] (summed over heads plus b_O: hook_attn_out)."""
        return torch.einsum("ibhe,ihed->ibhd", self.z, weights.W_O)


def last_position_forward(
    weights: AttentionWeights, tokens: Int[Tensor, "batch pos"]
) -> LastPosition:
    """Run every instance of `weights` ([instances, ...]) on `tokens` and keep the last
    position; equals the native TransformerLens model's last position (tested).

    Layer-0 keys and values depend only on (position, token), so they are computed once per
    (position, vocabulary entry) and gathered with `F.embedding`, whose backward is a cheap
    scatter into that small table; the last query sees every position, so no causal mask.
    """
    w = weights
    n_i, (B, L) = w.W_E.shape[0], tokens.shape
    V, d = w.W_E.shape[-2:]
    H, e = w.n_heads, w.d_head
    x_table = (w.W_pos[:, :L, None, :] + w.W_E[:, None]).reshape(n_i, L * V, d)
    W_KV = torch.cat([w.W_K, w.W_V], dim=-1).permute(0, 2, 1, 3).reshape(n_i, d, H * 2 * e)
    b_KV = torch.cat([w.b_K, w.b_V], dim=-1).reshape(n_i, 1, H * 2 * e)
    kv_table = torch.baddbmm(b_KV, x_table, W_KV)  # [n_i, L*V, H*2e]
    offsets = torch.arange(n_i, device=tokens.device)[:, None, None] * (L * V)
    flat = offsets + torch.arange(L, device=tokens.device) * V + tokens  # [n_i, B, L]
    kv = F.embedding(flat, kv_table.reshape(n_i * L * V, H * 2 * e)).view(n_i, B, L, H, 2 * e)
    k, v = kv[..., :e], kv[..., e:]
    direct = F.embedding(flat[:, :, -1], x_table.reshape(n_i * L * V, d))  # [n_i, B, d]
    q = torch.baddbmm(
        w.b_Q.reshape(n_i, 1, H * e), direct, w.W_Q.permute(0, 2, 1, 3).reshape(n_i, d, H * e)
    )
    scores = (q.view(n_i, B, 1, H, e) * k).sum(-1) / math.sqrt(e)  # [n_i, B, L, H]
    pattern = scores.softmax(dim=2)
    z = (pattern[..., None] * v).sum(2)  # [n_i, B, H, e]
    resid = torch.baddbmm(
        direct + w.b_O[:, None], z.reshape(n_i, B, H * e), w.W_O.reshape(n_i, H * e, d)
    )
    logits = torch.baddbmm(w.b_U[:, None], resid, w.W_U)
    return LastPosition(logits=logits, pattern=pattern.transpose(2, 3), z=z, direct=direct)


def task_loss(
    logits: Float[Tensor, "instances batch d_vocab"],
    answer: Int[Tensor, " batch"],
    answer_tokens: Int[Tensor, " answers"],
) -> Float[Tensor, " instances"]:
    """Per-instance cross-entropy over the answer tokens (outputs and NULL)."""
    answer_logits = logits[..., answer_tokens]  # [n_i, B, A]
    n_i, B, A = answer_logits.shape
    target = answer.expand(n_i, B).reshape(-1)
    return (
        F.cross_entropy(answer_logits.reshape(n_i * B, A), target, reduction="none")
        .view(n_i, B)
        .mean(-1)
    )


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@dataclass
class AttentionSuperpositionConfig:
    """Settings for training one-layer attention-only models on a skip-trigram task."""

    task: SkipTrigramTask = field(default_factory=SkipTrigramTask)
    """The task (setting, number of features, vocabulary, sequence length)."""
    n_heads: int = 4
    """Attention heads (fewer than the task's features, for superposition)."""
    d_head: int = 4
    """Width of each head (small: each head's OV and QK circuits have rank <= d_head)."""
    d_model: int = 32
    """Residual stream width."""
    n_instances: int = 4
    """Independent models (seeds) trained at once on the same batches."""
    steps: int = 600
    """Adam steps."""
    batch_size: int = 512
    """Fresh sequences per step (shared by the instances)."""
    lr: float = 1e-2
    """Adam learning rate (peak of the schedule)."""
    lr_schedule: LrSchedule = "cosine"
    """"constant" or "cosine" (half-cosine decay to 0)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW style) on the weight matrices, not the biases."""
    seed: int = 0
    """Seed of the initial weights and the data stream."""
    device: str = "cpu"
    """Torch device, e.g. "cpu" or "cuda"."""
    log_every: int = 50
    """Record the training loss every this many steps."""
    eval_examples: int = 256
    """Evaluation examples per feature (complete) and per destination (incomplete)."""

    def __post_init__(self) -> None:
        if not isinstance(self.task, SkipTrigramTask):
            raise InterplabError(f"task must be a SkipTrigramTask, got {self.task!r}.")
        for name in ("n_heads", "d_head", "d_model", "n_instances", "steps", "batch_size"):
            _check_int(name, getattr(self, name))
        _check_int("log_every", self.log_every)
        _check_int("eval_examples", self.eval_examples)
        _check_float("lr", self.lr, 0.0, math.inf, open_low=True)
        _check_float("weight_decay", self.weight_decay, 0.0, math.inf, open_low=False)
        if self.lr_schedule not in get_args(LrSchedule):
            raise unknown("lr_schedule", str(self.lr_schedule), get_args(LrSchedule), show_all=True)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise InterplabError(
                f"device {self.device!r} is not a torch device (expected e.g. 'cpu' or 'cuda')."
            ) from error


#: Parameters that get weight decay (matrices, not biases).
_DECAYED = ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_U")


@dataclass
class AttentionSuperpositionResult:
    """Trained models: weights [instances, ...], final loss and accuracy, loss history."""

    config: AttentionSuperpositionConfig
    """The settings used."""
    weights: AttentionWeights
    """Trained weights with a leading instance axis (on the CPU)."""
    loss: Float[Tensor, " instances"]
    """Cross-entropy on a balanced evaluation set (every feature complete, every
    destination incomplete, `eval_examples` each)."""
    accuracy: Float[Tensor, " instances"]
    """Accuracy (argmax over answers) on that evaluation set."""
    loss_history: Float[Tensor, "logs instances"]
    """Training-batch loss every `config.log_every` steps."""
    history_steps: list[int]
    """The step of each row of `loss_history`."""
    seconds: float
    """Wall-clock training time."""

    @property
    def task(self) -> SkipTrigramTask:
        return self.config.task

    def best_instance(self) -> int:
        """Index of the lowest-loss instance."""
        return int(self.loss.argmin())

    def analyse(
        self, instance: int | None = None, n_per_feature: int = 256, seed: int = 1
    ) -> FeatureHeads:
        """`analyse_features` for one instance (default: the lowest-loss one)."""
        i = self.best_instance() if instance is None else instance
        return analyse_features(self.weights.instance(i), self.task, n_per_feature, seed)

    def to_model(self, instance: int | None = None, device: str | None = None) -> Any:
        """Instance `instance` (default: lowest loss) as a native TransformerLens model
        (`interplab.load_model(ToyConfig(...))`) carrying the trained weights, for hooks."""
        i = self.best_instance() if instance is None else instance
        return to_model(self.weights.instance(i), self.task, device=device or "cpu")


def evaluation_batch(task: SkipTrigramTask, n_per_case: int, seed: int) -> SkipTrigramBatch:
    """A balanced set: `n_per_case` complete examples of each feature, then `n_per_case`
    incomplete examples per destination token (per feature for ov_incoherent, once for
    ov_coherent)."""
    gen = _generator(seed)
    parts = [task.sample(n_per_case, gen, feature=f, complete=True) for f in range(task.n_features)]
    negatives = range(task.n_features) if task.setting == "ov_incoherent" else [0]
    parts += [task.sample(n_per_case, gen, feature=f, complete=False) for f in negatives]
    return SkipTrigramBatch(
        *(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(SkipTrigramBatch))
    )


def _evaluate(
    weights: AttentionWeights, task: SkipTrigramTask, batch: SkipTrigramBatch
) -> tuple[Tensor, Tensor]:
    answers = task.answer_tokens.to(batch.tokens.device)
    with torch.no_grad():
        logits = last_position_forward(weights, batch.tokens).logits
        loss = task_loss(logits, batch.answer, answers)
        accuracy = (logits[..., answers].argmax(-1) == batch.answer).float().mean(-1)
    return loss, accuracy


def train_attention_superposition(
    config: AttentionSuperpositionConfig, progress: bool = True
) -> AttentionSuperpositionResult:
    """Train `config.n_instances` one-layer attention-only models on the skip-trigram task.

    Each step draws a fresh batch, computes the last-position cross-entropy over the answer
    tokens for every instance (`last_position_forward`, `task_loss`), and takes an Adam step
    (β = 0.9, 0.999; decoupled weight decay on matrices) with the configured schedule.
    Returns CPU weights and the loss and accuracy on a balanced evaluation set.
    """
    from tqdm.auto import tqdm

    task = config.task
    device = torch.device(config.device)
    gen = _generator(config.seed)
    weights = init_weights(
        config.n_instances,
        task.d_vocab,
        task.seq_len,
        config.d_model,
        config.n_heads,
        config.d_head,
        gen,
    ).map(lambda t: t.to(device).requires_grad_(True))
    params = weights.tensors()
    decayed = [getattr(weights, name) for name in _DECAYED]
    adam = _Adam([p.data for p in params])
    data_gen = _generator(config.seed + 1)
    answers = task.answer_tokens.to(device)

    history: list[Tensor] = []
    history_steps: list[int] = []
    start = time.perf_counter()
    bar = tqdm(
        range(config.steps), desc="attention superposition", disable=not progress, leave=False
    )
    for step in bar:
        batch = task.sample(config.batch_size, data_gen)
        tokens, answer = batch.tokens.to(device), batch.answer.to(device)
        loss = task_loss(last_position_forward(weights, tokens).logits, answer, answers)
        grads = torch.autograd.grad(loss.sum(), params)
        lr = config.lr * _lr_factor(config.lr_schedule, step, config.steps)
        if config.weight_decay:
            with torch.no_grad():
                for p in decayed:
                    p.mul_(1 - lr * config.weight_decay)
        adam.step(list(grads), lr)
        if step % config.log_every == 0 or step == config.steps - 1:
            history.append(loss.detach().cpu())
            history_steps.append(step)
            bar.set_postfix(loss=f"{loss.mean().item():.4g}", refresh=False)
    trained = weights.map(lambda t: t.detach())
    eval_batch = evaluation_batch(task, config.eval_examples, config.seed + 2)
    eval_batch = SkipTrigramBatch(
        *(getattr(eval_batch, f.name).to(device) for f in fields(SkipTrigramBatch))
    )
    loss, accuracy = _evaluate(trained, task, eval_batch)
    seconds = time.perf_counter() - start
    return AttentionSuperpositionResult(
        config=config,
        weights=trained.map(lambda t: t.cpu()),
        loss=loss.cpu(),
        accuracy=accuracy.cpu(),
        loss_history=torch.stack(history),
        history_steps=history_steps,
        seconds=seconds,
    )


def _lr_factor(schedule: LrSchedule, step: int, steps: int) -> float:
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


# --------------------------------------------------------------------------------------
# Analysis: how each feature is spread over heads, and interference
# --------------------------------------------------------------------------------------


@dataclass
class FeatureHeads:
    """Per-feature head attribution and interference of one trained model."""

    task: SkipTrigramTask
    """The task the model was trained on."""
    dla: Float[Tensor, "features heads"]
    """Mean direct logit attribution of each head to c_f's centred logit (logit of c_f
    minus the mean over answers) at the destination, over complete examples of f."""
    dla_sem: Float[Tensor, "features heads"]
    """Standard error of `dla` over those examples."""
    direct: Float[Tensor, " features"]
    """Mean attribution of the direct path (destination token and position embedding)."""
    bias: Float[Tensor, " features"]
    """Attribution of the biases b_O and b_U (the same for every example of f)."""
    logit: Float[Tensor, " features"]
    """Mean centred logit of c_f; equals Σ_h dla + direct + bias."""
    dla_via_source: Float[Tensor, "features heads"]
    """The part of `dla` carried by attention to the source token (attention weight times
    the head's OV output of the source); the rest comes from attending to other tokens."""
    participation_ratio: Float[Tensor, " features"]
    """(Σ_h |dla_h|)² / Σ_h dla_h²: the effective number of heads a feature uses (1 when one
    head carries it, n_heads when all carry it equally)."""
    heads_used: Int[Tensor, " features"]
    """Heads whose positive attribution is at least `share` of the feature's summed
    positive head attribution."""
    share: float
    """The share that counts a head as used."""
    accuracy: Float[Tensor, " features"]
    """Accuracy (argmax over answers is c_f) on complete examples of f."""
    accuracy_sem: Float[Tensor, " features"]
    """Its standard error."""
    null_accuracy: Float[Tensor, " destinations"]
    """Accuracy (answer NULL) on incomplete examples, per destination token."""
    attention_to_source: Float[Tensor, "features heads"]
    """Mean attention from the destination to the source, complete examples of f."""
    qk_selectivity: Float[Tensor, "features heads"]
    """QK circuit: attention score of b_f (last position) on a_f minus its mean score on
    filler tokens (context positions averaged); > 0 means the head prefers the source."""
    ov_table: Float[Tensor, "heads sources answers"]
    """OV circuit in centred answer-logit space: what each head writes to each answer
    when it attends fully to a source token (context positions averaged)."""
    ov_own: Float[Tensor, "features heads"]
    """`ov_table[h, a_f, c_f]`: the head's OV logit for f's own answer."""
    ov_interference: Float[Tensor, "features heads"]
    """max over other features g of `ov_table[h, a_f, c_g]`: the largest logit the head
    writes for another feature's answer when it reads f's source (OV interference)."""
    n_examples: int
    """Complete examples per feature the means are over."""

    @property
    def n_heads(self) -> int:
        return self.dla.shape[1]

    def summary(self) -> dict[str, float]:
        """Headline numbers (means over features)."""
        return {
            "accuracy": self.accuracy.mean().item(),
            "null_accuracy": self.null_accuracy.mean().item(),
            "mean_participation_ratio": self.participation_ratio.mean().item(),
            "features_on_more_than_one_head": int((self.heads_used > 1).sum()),
            "mean_heads_used": self.heads_used.float().mean().item(),
            "mean_attention_to_source": self.attention_to_source.max(1).values.mean().item(),
        }

    def rows(self) -> list[dict[str, Any]]:
        """One table row per feature."""
        out = []
        for f in range(self.dla.shape[0]):
            out.append(
                {
                    "feature": f,
                    "accuracy": self.accuracy[f].item(),
                    "centred logit": self.logit[f].item(),
                    "direct": self.direct[f].item(),
                    "head DLA": ", ".join(f"{v:+.2f}" for v in self.dla[f].tolist()),
                    "participation ratio": self.participation_ratio[f].item(),
                    "heads used": int(self.heads_used[f]),
                }
            )
        return out

    def plot(self) -> Figure:
        """Features x heads heatmap of the DLA (with the direct path as a last column),
        beside bars of each feature's participation ratio and accuracy."""
        from matplotlib.figure import Figure

        F_, H = self.dla.shape
        table = torch.cat([self.dla, self.direct[:, None]], dim=1).numpy()
        fig = Figure(figsize=(3.2 + 0.55 * (H + 1) + 3.0, 1.2 + 0.32 * F_), layout="constrained")
        ax_h, ax_p, ax_a = fig.subplots(1, 3, width_ratios=[H + 1, 2.2, 2.2])
        vmax = max(abs(table).max(), 1e-6)
        im = ax_h.imshow(table, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        ax_h.set_xticks(range(H + 1), [f"H{h}" for h in range(H)] + ["direct"])
        ax_h.set_yticks(range(F_))
        ax_h.set(ylabel="feature", title="DLA to c_f (centred logit)")
        for f in range(F_):
            for h in range(H + 1):
                ax_h.text(h, f, f"{table[f, h]:.1f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax_h, shrink=0.6)
        ys = range(F_)
        ax_p.barh(ys, self.participation_ratio.numpy(), color="#4c72b0")
        ax_p.axvline(1.0, color="0.5", lw=0.6, ls=":")
        ax_p.set(ylim=(F_ - 0.5, -0.5), xlim=(0, H), yticks=[], title="participation ratio")
        ax_a.barh(ys, self.accuracy.numpy(), xerr=self.accuracy_sem.numpy(), color="#55a868")
        ax_a.set(ylim=(F_ - 0.5, -0.5), xlim=(0, 1.05), yticks=[], title="accuracy")
        return fig

    def plot_circuits(self) -> Figure:
        """Per head: the OV circuit (sources x answers, centred logits) and the QK
        selectivity of each feature's destination for its source."""
        from matplotlib.figure import Figure

        H = self.n_heads
        fig = Figure(figsize=(2.6 * H, 5.0), layout="constrained")
        axes = fig.subplots(2, H, squeeze=False)
        ov = self.ov_table.numpy()
        vmax = max(abs(ov).max(), 1e-6)
        qk = self.qk_selectivity.numpy()
        qmax = max(abs(qk).max(), 1e-6)
        for h in range(H):
            axes[0, h].imshow(ov[h], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
            axes[0, h].set(title=f"H{h} OV", xlabel="answer (last = NULL)", ylabel="source")
            axes[1, h].bar(
                range(qk.shape[0]),
                qk[:, h],
                color=["#c44e52" if v < 0 else "#4c72b0" for v in qk[:, h]],
            )
            axes[1, h].set(
                ylim=(-qmax * 1.05, qmax * 1.05),
                xlabel="feature",
                title=f"H{h} QK: source - filler",
            )
        return fig


def analyse_features(
    weights: AttentionWeights,
    task: SkipTrigramTask,
    n_per_feature: int = 256,
    seed: int = 1,
    share: float = 0.2,
) -> FeatureHeads:
    """How each skip-trigram feature of one trained model is spread over its heads.

    Runs `n_per_feature` complete examples of every feature (and incomplete ones) and
    decomposes c_f's centred logit at the destination, u_f = W_U[:, c_f] - mean over
    answers, exactly into heads (z_h W_O[h] · u_f), the direct path and the biases (direct
    logit attribution). From the weights alone: the OV circuit of each head on each source
    ((W_E[a] + mean context W_pos) W_V + b_V) W_O · u, and the QK score of each
    destination on its source minus on fillers. See `FeatureHeads` for every field.
    `weights` are one model's (no instance axis).
    """
    _check_int("n_per_feature", n_per_feature)
    _check_float("share", share, 0.0, 1.0, open_low=True)
    if weights.W_E.ndim != 2:
        raise InterplabError(
            f"analyse_features takes one model's weights (W_E [d_vocab, d_model]), got W_E "
            f"of shape {list(weights.W_E.shape)}; use weights.instance(i)."
        )
    if weights.W_E.shape[0] != task.d_vocab or weights.W_pos.shape[0] < task.seq_len:
        raise InterplabError(
            f"weights (d_vocab {weights.W_E.shape[0]}, n_ctx {weights.W_pos.shape[0]}) do not "
            f"fit the task (d_vocab {task.d_vocab}, seq_len {task.seq_len})."
        )
    w = weights.map(lambda t: t.detach().float().cpu())
    nf, n = task.n_features, n_per_feature
    answers = task.answer_tokens
    table = task.features
    U = w.W_U[:, answers]
    U_c = U - U.mean(1, keepdim=True)  # [d, A]
    bU = w.b_U[answers]
    bU_c = bU - bU.mean()

    gen = _generator(seed)
    batch = task.sample(n * nf, gen, feature=torch.arange(nf).repeat_interleave(n), complete=True)
    with torch.no_grad():
        out = last_position_forward(w.map(lambda t: t[None]), batch.tokens)
        head_out = out.head_out(w.map(lambda t: t[None]))[0]  # [B, H, d]
    feat = batch.feature
    u = U_c[:, feat].T  # [B, d]
    dla_ex = torch.einsum("bhd,bd->bh", head_out, u).view(nf, n, -1)
    direct_ex = (out.direct[0] * u).sum(-1).view(nf, n)
    bias = w.b_O @ U_c[:, :nf] + bU_c[:nf]
    logit_ex = out.logits[0][:, answers]
    logit_ex = (logit_ex - logit_ex.mean(-1, keepdim=True)).gather(1, batch.answer[:, None])[:, 0]
    correct = (out.logits[0][:, answers].argmax(-1) == batch.answer).float().view(nf, n)

    # the source's share: attention weight on the source times the head's OV output there
    rows = torch.arange(n * nf)
    attn_src = out.pattern[0][rows, :, batch.source_pos]  # [B, H]
    x_src = w.W_E[table[feat, 0]] + w.W_pos[batch.source_pos]
    v_src = torch.einsum("bd,hde->bhe", x_src, w.W_V) + w.b_V
    ov_src = torch.einsum("bhe,hed,bd->bh", v_src, w.W_O, u)
    via_source = (attn_src * ov_src).view(nf, n, -1).mean(1)

    dla = dla_ex.mean(1)
    dla_sem = dla_ex.std(1) / math.sqrt(n) if n > 1 else torch.full_like(dla, math.nan)
    positive = dla.clamp_min(0)
    total_positive = positive.sum(1, keepdim=True)
    heads_used = ((positive >= share * total_positive) & (positive > 0)).sum(1)
    abs_dla = dla.abs()
    pr = abs_dla.sum(1).square() / dla.square().sum(1).clamp_min(1e-30)

    # null accuracy per destination
    dests = range(nf) if task.setting == "ov_incoherent" else [0]
    null_acc = []
    for f in dests:
        neg = task.sample(n, gen, feature=f, complete=False)
        with torch.no_grad():
            lg = last_position_forward(w.map(lambda t: t[None]), neg.tokens).logits[0][:, answers]
        null_acc.append((lg.argmax(-1) == nf).float().mean())

    ov_table, qk_sel = _circuits(w, task, U_c)
    src_index = table[:, 0] - task.n_filler  # source token -> row of ov_table
    ov_own = ov_table[:, src_index, torch.arange(nf)].T  # [F, H]
    others = ov_table[:, src_index, :nf].permute(1, 0, 2).clone()  # [F, H, nf]
    others[torch.arange(nf), :, torch.arange(nf)] = -math.inf
    acc = correct.mean(1)
    return FeatureHeads(
        task=task,
        dla=dla,
        dla_sem=dla_sem,
        direct=direct_ex.mean(1),
        bias=bias,
        logit=logit_ex.view(nf, n).mean(1),
        dla_via_source=via_source,
        participation_ratio=pr,
        heads_used=heads_used,
        share=share,
        accuracy=acc,
        accuracy_sem=correct.std(1) / math.sqrt(n) if n > 1 else torch.full_like(acc, math.nan),
        null_accuracy=torch.stack(null_acc),
        attention_to_source=attn_src.view(nf, n, -1).mean(1),
        qk_selectivity=qk_sel,
        ov_table=ov_table,
        ov_own=ov_own,
        ov_interference=others.max(-1).values,
        n_examples=n,
    )


def _circuits(w: AttentionWeights, task: SkipTrigramTask, U_c: Tensor) -> tuple[Tensor, Tensor]:
    """OV table [H, sources, answers] and QK selectivity [features, H] from the weights."""
    L = task.seq_len
    pos_ctx = w.W_pos[: L - 1].mean(0)
    x_src = w.W_E[task.source_tokens] + pos_ctx  # [S, d]
    v = torch.einsum("sd,hde->hse", x_src, w.W_V) + w.b_V[:, None]
    ov_table = torch.einsum("hse,hed,da->hsa", v, w.W_O, U_c)
    table = task.features
    x_dst = w.W_E[table[:, 1]] + w.W_pos[L - 1]  # [F, d]
    q = torch.einsum("fd,hde->fhe", x_dst, w.W_Q) + w.b_Q
    k_src = torch.einsum("fd,hde->fhe", w.W_E[table[:, 0]] + pos_ctx, w.W_K) + w.b_K
    k_fill = torch.einsum("td,hde->the", w.W_E[task.filler_tokens] + pos_ctx, w.W_K) + w.b_K
    scale = math.sqrt(w.d_head)
    score_src = (q * k_src).sum(-1) / scale  # [F, H]
    score_fill = torch.einsum("fhe,the->fht", q, k_fill).mean(-1) / scale
    return ov_table, score_src - score_fill


# --------------------------------------------------------------------------------------
# The native TransformerLens model
# --------------------------------------------------------------------------------------


def to_model(weights: AttentionWeights, task: SkipTrigramTask, device: str = "cpu") -> Any:
    """A native TransformerLens model (`interplab.load_model(ToyConfig(...))`: one layer,
    attention only, no normalisation, learned positions) carrying one model's `weights`,
    so every hook name (`blocks.0.attn.hook_pattern`, `hook_z`, ...) works on it."""
    import interplab
    from interplab.models import ToyConfig

    if weights.W_E.ndim != 2:
        raise InterplabError("to_model takes one model's weights; use weights.instance(i).")
    w = weights.map(lambda t: t.detach().float().cpu())
    H, d, e = w.W_Q.shape
    toy = ToyConfig(
        n_layers=1,
        d_model=d,
        n_heads=H,
        d_head=e,
        d_vocab=w.W_E.shape[0],
        n_ctx=w.W_pos.shape[0],
        attn_only=True,
        normalization="none",
        positional="standard",
    )
    model = interplab.load_model(toy, device="cpu")
    # nn.Linear layout: weight [out, in]; head h owns rows/columns h*d_head:(h+1)*d_head
    state = {
        "embed.weight": w.W_E,
        "pos_embed.weight": w.W_pos,
        "unembed.weight": w.W_U.T,
        "unembed.bias": w.b_U,
        "blocks.0.attn.o.weight": w.W_O.reshape(H * e, d).T,
        "blocks.0.attn.o.bias": w.b_O,
    }
    for name in "QKV":
        state[f"blocks.0.attn.{name.lower()}.weight"] = (
            getattr(w, f"W_{name}").permute(0, 2, 1).reshape(H * e, d)
        )
        state[f"blocks.0.attn.{name.lower()}.bias"] = getattr(w, f"b_{name}").reshape(H * e)
    current = model.state_dict()
    missing = sorted(set(current) - set(state))
    if missing:
        raise InterplabError(f"the native model has parameters {missing} that the toy lacks.")
    model.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()})
    return model.to(device).eval()
