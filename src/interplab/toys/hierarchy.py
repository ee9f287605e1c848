"""Hierarchical features with known ground truth: geometry, SAE absorption and splitting.

The generator (`HierarchyToy`) draws activations x = Σ_i a_i d_i + noise from features with
a known tree: `n_parents` parent concepts, each with `n_children` children. A parent fires
independently (probability `parent_probability`); partner parents (0 with 1, 2 with 3, ...)
also fire together with probability `pair_probability` (known co-occurrence); given its
parent, one child fires with probability `child_probability`, chosen uniformly among the
siblings (siblings are exclusive, like the values of a categorical concept). A child never
fires without its parent. Magnitudes a_i are uniform on [min_magnitude, max_magnitude].
With `d_model` below the number of features the directions d_i are in superposition.

Geometry (Park et al. 2024, "The geometry of categorical and hierarchical concepts in large
language models"): the representation of a child concept is ℓ_child = d_parent + d_child
(both fire), so ℓ_child - ℓ_parent = d_child. Park et al. find ℓ_parent ⟂ ℓ_child - ℓ_parent
and that the differences of sibling vectors form a simplex. Under "orthogonal" geometry
(orthonormal d_i, d_model >= features) both hold exactly; "random" directions (allowed in
superposition) hold them approximately; `parent_overlap` = α tilts every child's direction
towards its parent so that cos(ℓ_parent, ℓ_child - ℓ_parent) = α exactly, a known violation.
`parent_child_cosines` and `sibling_simplex` measure both properties for any vectors.

SAE metrics against the truth (`compare_to_truth`), for any `interplab.dictionaries`
dictionary: per true feature the best-matching latent by decoder cosine, and that latent's
recall and precision (fires when the feature is on / the feature is on when it fires);
absorption (Chanin et al. 2024, "A is for absorption"): the fraction of child-active tokens
on which the parent's latent does not fire although the parent is on, and how often the
child's latent fires there instead; splitting (Bricken et al. 2023, "Towards
monosemanticity"): how many latents point at each true feature, which grows with width.
`oracle_dictionary` and `absorbing_dictionary` build reference dictionaries by hand
(absorption exactly 0, and exactly 1 on chosen children).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.errors import InterplabError, unknown

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from interplab.dictionaries import Dictionary, DictionaryConfig

Geometry = Literal["orthogonal", "random"]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InterplabError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_unit(name: str, value: Any, *, open_low: bool = False, open_high: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if open_low else value >= 0) and (value < 1 if open_high else value <= 1)
    if not ok:
        interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        raise InterplabError(f"{name} must be a number in {interval}, got {value!r}.")


# --------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------


@dataclass
class HierarchyBatch:
    """Activations with their ground-truth feature activity."""

    x: Float[Tensor, "batch d_model"]
    """Activations Σ_i a_i d_i + noise."""
    active: Bool[Tensor, "batch features"]
    """Which features fire (parents first, then children parent by parent)."""
    magnitude: Float[Tensor, "batch features"]
    """a_i (0 where inactive)."""


@dataclass
class HierarchyToy:
    """A two-level tree of sparse features embedded in `d_model` dimensions.

    Feature order: parents 0..n_parents-1, then the children of parent 0, of parent 1, ...
    (child j of parent k is feature n_parents + k * n_children + j).
    """

    n_parents: int = 4
    """Parent concepts."""
    n_children: int = 4
    """Children per parent (mutually exclusive siblings)."""
    d_model: int = 32
    """Dimension of the activations (below n_features: superposition)."""
    geometry: Geometry = "orthogonal"
    """"orthogonal": orthonormal directions (needs d_model >= n_features); "random":
    independent uniformly random unit directions."""
    parent_overlap: float = 0.0
    """α: cosine between each child's direction and its parent's (0 = the child's offset is
    orthogonal to the parent, as Park et al. find; siblings then overlap by α²)."""
    parent_probability: float = 0.1
    """Chance that a parent fires on its own."""
    pair_probability: float = 0.0
    """Chance that partner parents (0 and 1, 2 and 3, ...) fire together (co-occurrence),
    on top of their own firing."""
    child_probability: float = 0.6
    """Chance that one of its children fires when a parent fires."""
    min_magnitude: float = 0.5
    """Smallest magnitude a_i of an active feature."""
    max_magnitude: float = 1.5
    """Largest magnitude (magnitudes are uniform in between)."""
    noise_std: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to x."""
    seed: int = 0
    """Seed of the feature directions."""

    def __post_init__(self) -> None:
        _check_int("n_parents", self.n_parents, 1)
        _check_int("n_children", self.n_children, 2)
        _check_int("d_model", self.d_model, 2)
        if self.geometry not in get_args(Geometry):
            raise unknown("geometry", str(self.geometry), get_args(Geometry), show_all=True)
        if self.geometry == "orthogonal" and self.d_model < self.n_features:
            raise InterplabError(
                f"geometry 'orthogonal' needs d_model >= n_features ({self.n_features}), got "
                f"d_model={self.d_model}; use geometry='random' for superposition."
            )
        _check_unit("parent_overlap", self.parent_overlap, open_high=True)
        _check_unit("parent_probability", self.parent_probability, open_low=True)
        _check_unit("pair_probability", self.pair_probability)
        _check_unit("child_probability", self.child_probability)
        lo, hi = self.min_magnitude, self.max_magnitude
        if not (isinstance(lo, int | float) and isinstance(hi, int | float) and 0 < lo <= hi):
            raise InterplabError(
                f"magnitudes need 0 < min_magnitude <= max_magnitude, got {lo!r} and {hi!r}."
            )
        if not (isinstance(self.noise_std, int | float) and self.noise_std >= 0):
            raise InterplabError(f"noise_std must be a number >= 0, got {self.noise_std!r}.")
        self._directions = self._make_directions()

    # ---------------------------------------------------------------- structure
    @property
    def n_features(self) -> int:
        """Parents plus children."""
        return self.n_parents * (1 + self.n_children)

    @property
    def parents(self) -> Int[Tensor, " n_parents"]:
        """Feature indices of the parents."""
        return torch.arange(self.n_parents)

    @property
    def children(self) -> Int[Tensor, " n_child_features"]:
        """Feature indices of all children."""
        return torch.arange(self.n_parents, self.n_features)

    @property
    def parent_of(self) -> Int[Tensor, " features"]:
        """The parent of each feature (-1 for parents)."""
        out = torch.full((self.n_features,), -1)
        out[self.n_parents :] = torch.arange(self.n_parents).repeat_interleave(self.n_children)
        return out

    @property
    def partner(self) -> Int[Tensor, " n_parents"]:
        """Each parent's co-occurrence partner (k xor 1; -1 for an odd one out)."""
        k = torch.arange(self.n_parents)
        mate = k ^ 1
        return torch.where(mate < self.n_parents, mate, -1)

    @property
    def directions(self) -> Float[Tensor, "features d_model"]:
        """Unit direction d_i of every feature (the ground-truth dictionary)."""
        return self._directions.clone()

    def concept_vectors(self) -> Float[Tensor, "features d_model"]:
        """Park et al.'s concept vectors at unit magnitude: ℓ_parent = d_parent,
        ℓ_child = d_parent + d_child (a child's tokens carry the parent too)."""
        vectors = self.directions
        kids = self.children
        vectors[kids] = vectors[kids] + vectors[self.parent_of[kids]]
        return vectors

    def densities(self) -> Float[Tensor, " features"]:
        """Expected firing probability of every feature (closed form)."""
        p, q = self.parent_probability, self.pair_probability
        parent = torch.where(
            self.partner >= 0,
            torch.tensor(1 - (1 - p) * (1 - q)),
            torch.tensor(p),
        )
        child = parent.repeat_interleave(self.n_children) * self.child_probability / self.n_children
        return torch.cat([parent, child]).float()

    def parent_cooccurrence(self) -> Float[Tensor, "n_parents n_parents"]:
        """Expected P(parent i and parent j both fire) (closed form; diagonal = density).
        Partners fire together with probability q + (1 - q) p², others independently."""
        p, q = self.parent_probability, self.pair_probability
        density = self.densities()[: self.n_parents].double()
        joint = density[:, None] * density[None, :]
        k = torch.arange(self.n_parents)
        mates = self.partner >= 0
        joint[k[mates], self.partner[mates]] = q + (1 - q) * p * p
        joint[k, k] = density
        return joint.float()

    def _make_directions(self) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        g = torch.randn(self.d_model, self.n_features, generator=gen, dtype=torch.float64)
        if self.geometry == "orthogonal":
            q, r = torch.linalg.qr(g)  # columns orthonormal
            d = (q * torch.sign(torch.diagonal(r))).T
        else:
            d = (g / g.norm(dim=0)).T
        alpha = float(self.parent_overlap)
        if alpha:
            kids = torch.arange(self.n_parents, self.n_features)
            par = d[self.parent_of[kids]]
            rest = d[kids] - (d[kids] * par).sum(-1, keepdim=True) * par
            rest = rest / rest.norm(dim=-1, keepdim=True)
            d[kids] = alpha * par + math.sqrt(1 - alpha**2) * rest
        return d.float()

    # ---------------------------------------------------------------- sampling
    def sample(self, n: int, generator: torch.Generator | int = 0) -> HierarchyBatch:
        """Draw `n` activation vectors with their ground-truth activity (see module docstring)."""
        _check_int("n", n, 1)
        gen = generator if isinstance(generator, torch.Generator) else _generator(generator)
        P, m = self.n_parents, self.n_children
        parent_on = torch.rand(n, P, generator=gen) < self.parent_probability
        if self.pair_probability > 0:
            n_pairs = P // 2
            together = torch.rand(n, n_pairs, generator=gen) < self.pair_probability
            parent_on[:, : 2 * n_pairs] |= together.repeat_interleave(2, dim=1)
        has_child = parent_on & (torch.rand(n, P, generator=gen) < self.child_probability)
        which = torch.randint(0, m, (n, P), generator=gen)
        child_on = torch.zeros(n, P, m, dtype=torch.bool)
        child_on.scatter_(2, which[..., None], has_child[..., None])
        active = torch.cat([parent_on, child_on.reshape(n, P * m)], dim=1)
        lo, hi = float(self.min_magnitude), float(self.max_magnitude)
        magnitude = (lo + (hi - lo) * torch.rand(n, self.n_features, generator=gen)) * active
        x = magnitude @ self._directions
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(x.shape, generator=gen)
        return HierarchyBatch(x=x, active=active, magnitude=magnitude)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[Tensor]:
        """An endless stream of activation batches x [batch_size, d_model] (for training)."""
        gen = _generator(seed)
        while True:
            yield self.sample(batch_size, gen).x


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# --------------------------------------------------------------------------------------
# Geometry: orthogonality between levels, simplices of siblings (Park et al. 2024)
# --------------------------------------------------------------------------------------


def parent_child_cosines(
    vectors: Float[Tensor, "features d_model"], parent_of: Int[Tensor, " features"]
) -> Float[Tensor, " children"]:
    """cos(ℓ_parent, ℓ_child - ℓ_parent) for every feature with a parent (in feature order).

    Park et al. 2024 (Theorem / Fig. 2): 0 for hierarchically related concepts."""
    _check_vectors(vectors, parent_of)
    kids = torch.nonzero(parent_of >= 0)[:, 0]
    par = vectors[parent_of[kids]].double()
    diff = vectors[kids].double() - par
    cos = (par * diff).sum(-1) / (par.norm(dim=-1) * diff.norm(dim=-1)).clamp_min(1e-30)
    return cos.float()


@dataclass
class SimplexCheck:
    """Whether the sibling difference vectors ℓ_child - ℓ_parent of each parent form a
    simplex (affinely independent points), and how regular it is."""

    gram: Float[Tensor, "parents children children"]
    """Cosine Gram matrix of the difference vectors of each parent's children."""
    affine_rank: Int[Tensor, " parents"]
    """Rank of the siblings' centred vectors v_j - mean_k v_k; n_children - 1 for a
    simplex."""
    min_singular_value: Float[Tensor, " parents"]
    """The (n_children - 1)-th singular value of the centred vectors relative to the
    largest: 0 when the siblings are affinely dependent, 1 for a regular simplex."""
    mean_offdiagonal_cosine: Float[Tensor, " parents"]
    """Mean cosine between distinct siblings' difference vectors (0 for orthogonal ones)."""

    @property
    def is_simplex(self) -> Bool[Tensor, " parents"]:
        """Affine independence of each parent's siblings."""
        return self.affine_rank == self.gram.shape[-1] - 1


def sibling_simplex(
    vectors: Float[Tensor, "features d_model"],
    parent_of: Int[Tensor, " features"],
    rtol: float = 1e-4,
) -> SimplexCheck:
    """Check that each parent's children form a simplex (Park et al. 2024: categorical
    concepts are simplices, with the sibling differences orthogonal to the parent).

    Uses the difference vectors v_c = ℓ_c - ℓ_parent; the siblings are affinely independent
    when the centred v_j - mean_k v_k have rank n_children - 1 (singular values above
    `rtol` times the largest). Every parent must have the same number of children.
    """
    _check_vectors(vectors, parent_of)
    groups = [torch.nonzero(parent_of == p)[:, 0] for p in range(int(parent_of.max()) + 1)]
    groups = [g for g in groups if g.numel()]
    sizes = {int(g.numel()) for g in groups}
    if len(sizes) != 1 or min(sizes) < 2:
        raise InterplabError(
            f"sibling_simplex needs every parent to have the same number (>= 2) of children, "
            f"got sizes {sorted(sizes)}."
        )
    v = vectors.double()
    grams, ranks, smin, offdiag = [], [], [], []
    for g in groups:
        p = int(parent_of[g[0]])
        diff = v[g] - v[p]
        unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        gram = unit @ unit.T
        m = gram.shape[0]
        s = torch.linalg.svdvals(diff - diff.mean(0))  # descending; the m-th is ~0
        top = s[0].clamp_min(1e-30)
        ranks.append(int((s > rtol * top).sum()))
        smin.append((s[m - 2] / top).item())
        offdiag.append(((gram.sum() - gram.diagonal().sum()) / (m * (m - 1))).item())
        grams.append(gram.float())
    return SimplexCheck(
        gram=torch.stack(grams),
        affine_rank=torch.tensor(ranks),
        min_singular_value=torch.tensor(smin),
        mean_offdiagonal_cosine=torch.tensor(offdiag),
    )


def _check_vectors(vectors: Tensor, parent_of: Tensor) -> None:
    if vectors.ndim != 2 or parent_of.ndim != 1 or vectors.shape[0] != parent_of.shape[0]:
        raise InterplabError(
            f"expected vectors [features, d] and parent_of [features], got "
            f"{list(vectors.shape)} and {list(parent_of.shape)}."
        )
    if int(parent_of.max()) < 0:
        raise InterplabError("parent_of marks no feature as a child (all entries are -1).")


# --------------------------------------------------------------------------------------
# SAE metrics against the ground truth
# --------------------------------------------------------------------------------------


@dataclass
class TruthComparison:
    """A dictionary's latents compared with the toy's true features on one sample."""

    cosines: Float[Tensor, "features d_sae"]
    """cos(d_i, W_dec[j]) for every true feature i and latent j."""
    best_latent: Int[Tensor, " features"]
    """The best-matching latent of each true feature: highest match score, the larger of
    the decoder row's cosine with the feature's direction d_i and with its concept vector
    ℓ_i (for a child d_parent + d_child, so an absorbing child latent still matches its
    child; for a parent both are d_parent)."""
    best_cosine: Float[Tensor, " features"]
    """That match score."""
    recall: Float[Tensor, " features"]
    """P(best latent fires | feature on)."""
    precision: Float[Tensor, " features"]
    """P(feature on | best latent fires) (NaN if the latent never fires)."""
    absorption: Float[Tensor, " children"]
    """Per child (feature order): P(parent's latent off | child on); the parent is on on
    all these tokens, so this is the parent latent's miss rate caused by the child."""
    absorption_sem: Float[Tensor, " children"]
    """Standard error of `absorption` over the child-active tokens."""
    absorbed_by_child: Float[Tensor, " children"]
    """P(parent's latent off and child's latent on | child on): misses where the child's
    latent fired instead (Chanin et al.'s absorption, rather than a dead parent latent)."""
    parent_only_recall: Float[Tensor, " parents"]
    """P(parent's latent fires | parent on, no child on): the control that separates
    absorption (high here, low with a child) from a parent latent that never works."""
    child_decoder_parent_cosine: Float[Tensor, " children"]
    """cos(W_dec[child's latent], d_parent): the parent direction absorbed into the child
    latent's decoder (0 without absorption, 1/√2 for d_parent + d_child)."""
    latents_per_feature: Int[Tensor, " features"]
    """Latents assigned to each feature: those whose best-scoring true feature (match
    score as for `best_latent`) is this one, with score >= `split_threshold` (splitting
    when > 1)."""
    split_threshold: float
    """Match score a latent needs to be assigned to a feature."""
    absorption_rate: float
    """Mean of `absorption` weighted by child frequency: P(parent latent off | some child on)."""
    absorption_rate_sem: float
    """Its standard error over the child-active tokens."""
    dead_latents: int
    """Latents that never fired on the sample."""
    n_tokens: int
    """Tokens in the sample."""
    parent_of: Int[Tensor, " features"]
    """The tree (see `HierarchyToy.parent_of`)."""

    def summary(self) -> dict[str, float]:
        """Headline numbers."""
        n_parents = int((self.parent_of < 0).sum())
        return {
            "mean_best_cosine": self.best_cosine.mean().item(),
            "mean_recall": self.recall.mean().item(),
            "mean_precision": self.precision.nanmean().item(),
            "absorption_rate": self.absorption_rate,
            "absorption_rate_sem": self.absorption_rate_sem,
            "absorbed_by_child_rate": self.absorbed_by_child.mean().item(),
            "parent_only_recall": self.parent_only_recall.mean().item(),
            "mean_latents_per_parent": self.latents_per_feature[:n_parents].float().mean().item(),
            "mean_latents_per_child": self.latents_per_feature[n_parents:].float().mean().item(),
            "split_features": int((self.latents_per_feature > 1).sum()),
            "dead_latents": self.dead_latents,
        }

    def plot_cosines(self, title: str | None = None) -> Figure:
        """Heatmap of |cos(true feature, latent decoder)|, latents ordered by their best
        feature, with the parent/child boundary marked."""
        from matplotlib.figure import Figure

        cos = self.cosines
        order = torch.argsort(cos.argmax(0) * 10 - cos.max(0).values)  # group by feature
        data = cos[:, order].numpy()
        F_, S = data.shape
        fig = Figure(figsize=(1.6 + 0.16 * S, 1.2 + 0.18 * F_), layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(data, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        n_parents = int((self.parent_of < 0).sum())
        ax.axhline(n_parents - 0.5, color="k", lw=0.8)
        ax.set(xlabel="latent (grouped by best feature)", ylabel="true feature (parents on top)")
        ax.set_yticks(range(F_))
        if title:
            ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.7, label="cos(d_i, W_dec[j])")
        return fig


def compare_to_truth(
    dictionary: Dictionary,
    toy: HierarchyToy,
    batch: HierarchyBatch | None = None,
    n_tokens: int = 20_000,
    seed: int = 12345,
    split_threshold: float = 0.5,
    fire_threshold: float = 0.0,
) -> TruthComparison:
    """Compare a dictionary's latents with the toy's true features (see `TruthComparison`).

    Latents are encoded on `batch` (default: `n_tokens` fresh samples with `seed`); a latent
    fires where its activation exceeds `fire_threshold`. Matching is by decoder cosine with
    the feature's direction or concept vector (see `TruthComparison.best_latent`); firing
    metrics use the matched latent: for feature i with best latent j, recall
    P(j fires | i on) and precision P(i on | j fires); absorption follows Chanin et al. 2024.
    """
    if dictionary.d_in != toy.d_model:
        raise InterplabError(
            f"the dictionary reads d_in={dictionary.d_in} but the toy has d_model={toy.d_model}."
        )
    _check_unit("split_threshold", split_threshold, open_low=True)
    data = batch if batch is not None else toy.sample(n_tokens, seed)
    W_dec = dictionary.W_dec.detach().float().cpu()
    dec_unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    D = toy.directions
    cosines = D @ dec_unit.T  # [F, S]
    concepts = toy.concept_vectors()
    concepts = concepts / concepts.norm(dim=1, keepdim=True)
    # a latent for "parent and child" decodes to d_parent + d_child, the child's concept
    # vector: scoring against it as well gives such latents to the child, not the parent
    score = torch.maximum(cosines, concepts @ dec_unit.T)
    best_cos, best = score.max(1)
    with torch.no_grad():
        latents = dictionary.encode(data.x.to(dictionary.W_enc.device)).float().cpu()
    fires = latents > fire_threshold  # [N, S]
    metrics = firing_metrics(fires, data.active, best, toy.parent_of)
    assigned_cos, assigned = score.max(0)  # each latent's best feature
    keep = assigned_cos >= split_threshold
    per_feature = torch.bincount(assigned[keep], minlength=toy.n_features)
    kids = toy.children
    child_dec = dec_unit[best[kids]]
    parent_dir = D[toy.parent_of[kids]]
    return TruthComparison(
        cosines=cosines,
        best_latent=best,
        best_cosine=best_cos,
        recall=metrics["recall"],
        precision=metrics["precision"],
        absorption=metrics["absorption"],
        absorption_sem=metrics["absorption_sem"],
        absorbed_by_child=metrics["absorbed_by_child"],
        parent_only_recall=metrics["parent_only_recall"],
        child_decoder_parent_cosine=(child_dec * parent_dir).sum(-1),
        latents_per_feature=per_feature,
        split_threshold=split_threshold,
        absorption_rate=float(metrics["absorption_rate"]),
        absorption_rate_sem=float(metrics["absorption_rate_sem"]),
        dead_latents=int((~fires.any(0)).sum()),
        n_tokens=int(data.x.shape[0]),
        parent_of=toy.parent_of,
    )


def firing_metrics(
    fires: Bool[Tensor, "batch d_sae"],
    active: Bool[Tensor, "batch features"],
    latent_of: Int[Tensor, " features"],
    parent_of: Int[Tensor, " features"],
) -> dict[str, Tensor]:
    """Recall, precision and absorption from firing patterns, given which latent stands for
    which feature (`latent_of`) and the tree (`parent_of`). Returns tensors keyed
    "recall", "precision" [features], "absorption", "absorption_sem", "absorbed_by_child"
    [children], "parent_only_recall" [parents], "absorption_rate", "absorption_rate_sem"
    (scalars, pooled over child-active tokens)."""
    f = fires[:, latent_of]  # [N, F]: the matched latent of each feature fires
    act = active
    on = act.sum(0)
    recall = (f & act).sum(0) / on.clamp_min(1)
    recall = torch.where(on > 0, recall, torch.full_like(recall, math.nan))
    fired = f.sum(0)
    precision = (f & act).sum(0) / fired.clamp_min(1)
    precision = torch.where(fired > 0, precision, torch.full_like(precision, math.nan))

    kids = torch.nonzero(parent_of >= 0)[:, 0]
    parents = torch.nonzero(parent_of < 0)[:, 0]
    par = parent_of[kids]
    child_on = act[:, kids]  # [N, C]
    parent_latent_off = ~f[:, par]  # [N, C]
    child_latent_on = f[:, kids]
    n_child = child_on.sum(0)
    miss = (child_on & parent_latent_off).sum(0) / n_child.clamp_min(1)
    absorbed = (child_on & parent_latent_off & child_latent_on).sum(0) / n_child.clamp_min(1)
    nan = torch.full_like(miss, math.nan)
    miss = torch.where(n_child > 0, miss, nan)
    absorbed = torch.where(n_child > 0, absorbed, nan)
    sem = torch.where(n_child > 1, (miss * (1 - miss) / (n_child - 1).clamp_min(1)).sqrt(), nan)

    # parent-only tokens: the parent on and none of its children
    child_count = torch.zeros(act.shape[0], parents.numel())
    child_count.index_add_(1, par, child_on.float())
    alone = act[:, parents] & (child_count == 0)
    n_alone = alone.sum(0)
    parent_only = (alone & f[:, parents]).sum(0) / n_alone.clamp_min(1)
    parent_only = torch.where(n_alone > 0, parent_only, torch.full_like(parent_only, math.nan))

    # pooled over (token, child) pairs with the child on: children are exclusive per parent
    pooled = (child_on & parent_latent_off)[child_on].float()
    rate = pooled.mean() if pooled.numel() else torch.tensor(math.nan)
    rate_sem = (
        pooled.std() / math.sqrt(pooled.numel()) if pooled.numel() > 1 else torch.tensor(math.nan)
    )
    return {
        "recall": recall.float(),
        "precision": precision.float(),
        "absorption": miss.float(),
        "absorption_sem": sem.float(),
        "absorbed_by_child": absorbed.float(),
        "parent_only_recall": parent_only.float(),
        "absorption_rate": rate,
        "absorption_rate_sem": rate_sem,
    }


# --------------------------------------------------------------------------------------
# Reference dictionaries built by hand
# --------------------------------------------------------------------------------------


def oracle_dictionary(toy: HierarchyToy) -> Dictionary:
    """A ReLU dictionary whose latents are the true features: W_dec = the directions,
    W_enc = their pseudo-inverse, b_dec = 0, and b_enc a hair below 0 (1e-3 of the smallest
    magnitude) so float rounding never fires a latent. With orthogonal directions (and no
    noise) the latents equal the true magnitudes less that hair, so recall and precision
    are 1 and absorption 0."""
    from interplab.dictionaries import ReLU, build_dictionary

    D = toy.directions
    sae = build_dictionary(ReLU(d_sae=toy.n_features), toy.d_model)
    with torch.no_grad():
        sae.W_dec.copy_(D)
        sae.W_enc.copy_(torch.linalg.pinv(D.double()).float())
        sae.b_enc.fill_(-1e-3 * toy.min_magnitude)
        sae.b_dec.zero_()
    return sae.eval()


def absorbing_dictionary(toy: HierarchyToy, absorbed: Sequence[int]) -> Dictionary:
    """The oracle dictionary, edited so that the children `absorbed` (feature indices)
    absorb their parent (Chanin et al. 2024): the parent latent's encoder gets a large
    negative weight on each absorbed child's direction, so it is silent whenever that child
    is on, and the child latent decodes to d_child + d_parent. On orthogonal directions the
    absorption of those children is exactly 1 and of the others 0."""
    kids = set(toy.children.tolist())
    bad = [c for c in absorbed if c not in kids]
    if bad:
        raise InterplabError(
            f"absorbed must list child features ({toy.n_parents}..{toy.n_features - 1}), got {bad}."
        )
    sae = oracle_dictionary(toy)
    D = toy.directions
    # the parent pre-activation a_p - w a_c stays <= 0 for every magnitude pair when
    # w >= max / min magnitude
    w = 1.0 + toy.max_magnitude / toy.min_magnitude
    with torch.no_grad():
        for c in absorbed:
            p = int(toy.parent_of[c])
            sae.W_enc[:, p] -= w * D[c]
            sae.W_dec[c] = D[c] + D[p]
    return sae


# --------------------------------------------------------------------------------------
# Training SAEs on the toy
# --------------------------------------------------------------------------------------


def train_saes(
    toy: HierarchyToy,
    configs: Sequence[DictionaryConfig],
    n_tokens: int = 2_000_000,
    batch_size: int = 1024,
    lr: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> list[Dictionary]:
    """Train one dictionary per config on fresh samples from `toy` (all configs see the
    same stream; `interplab.dictionaries.train_dictionaries`). Inputs are scaled so
    E||x||² = d_model during training and the scale is folded back (the trainer's default).
    `lr` None uses the trainer's width-scaled default."""
    from interplab.dictionaries import TrainConfig, train_dictionaries

    _check_int("n_tokens", n_tokens, 1)
    _check_int("batch_size", batch_size, 1)
    cfg = TrainConfig(
        batch_size=batch_size,
        total_tokens=max(n_tokens, batch_size),
        lr=lr,
        lr_warmup_steps=100,
        checkpoint_every=None,
        progress=progress,
        seed=seed,
        log_every=10**9,
    )
    return train_dictionaries(configs, toy.batches(batch_size, seed + 1), cfg, device=device)
