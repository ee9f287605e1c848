"""Compare two dictionaries: which latents they share, up to permutation, rotation and function.

`compare_dictionaries(a, b, data=None)` measures, from the weights:

* max cosine similarity of each decoder row (and encoder column) of `a` with any of `b`,
  and of `b` with `a` (the "mean max cosine" of Sharkey et al. 2022 and Bricken et al. 2023
  for feature universality); `shared_fraction(t)` is the fraction of latents whose best
  partner is closer than t;
* a one-to-one matching: the Hungarian assignment (`scipy.optimize.linear_sum_assignment`)
  that maximises the summed decoder cosine; with different widths min(d_sae_a, d_sae_b)
  pairs are matched;
* linear equivalence: the orthogonal map R minimising ||A R - B||_F over paired unit decoder
  rows (orthogonal Procrustes, Schoenemann 1966; `scipy.linalg.orthogonal_procrustes`), with
  the pairs taken from the decoder matching, from latent activations on `data`, or by index;
  after fitting, a + rotation is re-matched and re-fitted a few times (alternating matching
  and Procrustes). It reports the residual fraction ||A R - B||^2 / ||B||^2 on the pairs and
  the Hungarian-matched cosine of the rotated decoder;

and, when `data` (activations [n, d_in]) is given, functional agreement:

* reconstruction agreement: FVU between the two reconstructions, sum ||x_hat_a - x_hat_b||^2
  divided by the mean of their total variances (symmetric in a and b), and their mean cosine;
* Pearson correlation over tokens of the activations of decoder-matched latent pairs;
* a functional matching: Hungarian on the latent activation correlations, and the fraction
  of decoder-matched pairs that it pairs the same way.

`opposing_pairs(dictionary, threshold=-0.9)` lists near-antipodal decoder rows within one
dictionary (latents that encode +v and -v, e.g. a feature and its negation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.dictionaries.base import Dictionary
from interplab.errors import InterplabError

PairSource = Literal["auto", "matched", "activations", "index"]
SHARED_THRESHOLDS = (0.7, 0.9)


# ---------------------------------------------------------------------------- results
@dataclass
class Matching:
    """A one-to-one pairing of latents of `a` with latents of `b`."""

    rows_a: Int[Tensor, " pair"]
    """Latent indices in `a`."""
    cols_b: Int[Tensor, " pair"]
    """The latent of `b` paired with each."""
    score: Float[Tensor, " pair"]
    """Similarity of each pair (decoder cosine, or activation correlation)."""

    @property
    def mean_score(self) -> float:
        return float(self.score.mean()) if self.score.numel() else float("nan")

    def partner_of(self, n_a: int) -> Int[Tensor, " d_sae_a"]:
        """For every latent of `a`, its partner in `b` (-1 when unmatched)."""
        out = torch.full((n_a,), -1, dtype=torch.long)
        out[self.rows_a] = self.cols_b
        return out


@dataclass
class ProcrustesFit:
    """Orthogonal map from a's decoder directions onto b's (see module docstring)."""

    rotation: Float[Tensor, "d d"]
    """R with a.W_dec (unit rows) @ R ~ b.W_dec (unit rows) on the pairs."""
    pairs_from: str
    """Where the initial pairs came from: "matched", "activations" or "index"."""
    residual_fraction: float
    """||A R - B||^2 / ||B||^2 on the final pairs (0 = exact rotation)."""
    matching: Matching
    """Hungarian matching of the rotated decoder rows of a with b's."""

    @property
    def matched_cosine(self) -> float:
        """Mean cosine of the matched pairs after rotation."""
        return self.matching.mean_score


@dataclass
class FunctionalAgreement:
    """How alike the two dictionaries behave on the same activations."""

    n_tokens: int
    """Rows of `data` used."""
    reconstruction_fvu: float
    """sum ||x_hat_a - x_hat_b||^2 / mean of their total variances."""
    reconstruction_cosine: float
    """Mean over tokens of cos(x_hat_a, x_hat_b)."""
    matched_correlation: Float[Tensor, " pair"]
    """Pearson correlation of each decoder-matched pair's activations (nan if one never fires)."""
    activation_matching: Matching
    """Hungarian matching on latent activation correlations."""
    matching_agreement: float
    """Fraction of decoder-matched pairs that the activation matching pairs the same way."""

    @property
    def mean_matched_correlation(self) -> float:
        """Mean correlation over decoder-matched pairs where both latents fire."""
        ok = self.matched_correlation[~self.matched_correlation.isnan()]
        return float(ok.mean()) if ok.numel() else float("nan")


@dataclass
class Comparison:
    """Everything `compare_dictionaries` measured (see module docstring)."""

    d_sae_a: int
    d_sae_b: int
    decoder_max_cos_a: Float[Tensor, " d_sae_a"]
    """For each latent of a, the largest decoder cosine with any latent of b."""
    decoder_max_cos_b: Float[Tensor, " d_sae_b"]
    """For each latent of b, the largest decoder cosine with any latent of a."""
    decoder_nearest_a: Int[Tensor, " d_sae_a"]
    """For each latent of a, the latent of b that attains `decoder_max_cos_a`."""
    encoder_max_cos_a: Float[Tensor, " d_sae_a"] | None
    """Same for encoder columns (None when the input widths differ)."""
    encoder_max_cos_b: Float[Tensor, " d_sae_b"] | None
    matching: Matching | None
    """Hungarian matching on decoder cosine (None when skipped)."""
    procrustes: ProcrustesFit | None
    """Orthogonal alignment (None when skipped)."""
    functional: FunctionalAgreement | None = None
    """Agreement on `data` (None without data)."""
    names: tuple[str, str] = ("a", "b")
    """Labels of the two dictionaries."""

    def shared_fraction(self, threshold: float, of: Literal["a", "b"] = "a") -> float:
        """Fraction of the latents of `of` whose best decoder partner in the other dictionary
        has cosine > threshold."""
        if of not in ("a", "b"):
            raise InterplabError(f"of must be 'a' or 'b', got {of!r}.")
        values = self.decoder_max_cos_a if of == "a" else self.decoder_max_cos_b
        return float((values > threshold).float().mean())

    def summary(self) -> dict[str, float]:
        """Scalar results for tables and logs."""
        out: dict[str, float] = {
            "d_sae_a": float(self.d_sae_a),
            "d_sae_b": float(self.d_sae_b),
            "decoder_mean_max_cos_a": float(self.decoder_max_cos_a.mean()),
            "decoder_mean_max_cos_b": float(self.decoder_max_cos_b.mean()),
        }
        if self.encoder_max_cos_a is not None and self.encoder_max_cos_b is not None:
            out["encoder_mean_max_cos_a"] = float(self.encoder_max_cos_a.mean())
            out["encoder_mean_max_cos_b"] = float(self.encoder_max_cos_b.mean())
        for t in SHARED_THRESHOLDS:
            out[f"shared_a@{t}"] = self.shared_fraction(t, "a")
            out[f"shared_b@{t}"] = self.shared_fraction(t, "b")
        if self.matching is not None:
            out["matched_cosine"] = self.matching.mean_score
        if self.procrustes is not None:
            out["procrustes_residual_fraction"] = self.procrustes.residual_fraction
            out["procrustes_matched_cosine"] = self.procrustes.matched_cosine
        if self.functional is not None:
            f = self.functional
            out["reconstruction_fvu"] = f.reconstruction_fvu
            out["reconstruction_cosine"] = f.reconstruction_cosine
            out["matched_latent_correlation"] = f.mean_matched_correlation
            out["activation_matched_correlation"] = f.activation_matching.mean_score
            out["matching_agreement"] = f.matching_agreement
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the summary plus the matchings (index pairs and scores)."""
        out: dict[str, Any] = {
            "names": list(self.names),
            "summary": {k: (v if np.isfinite(v) else None) for k, v in self.summary().items()},
        }
        if self.matching is not None:
            out["matching"] = _matching_dict(self.matching)
        if self.procrustes is not None:
            out["procrustes"] = {
                "pairs_from": self.procrustes.pairs_from,
                "residual_fraction": self.procrustes.residual_fraction,
                "matching": _matching_dict(self.procrustes.matching),
            }
        return out

    def table_rows(self) -> list[tuple[str, str]]:
        """(quantity, formatted value) rows for a short printed table."""
        return [(k, f"{v:.4g}") for k, v in self.summary().items()]

    def plot_max_cosine(self, axes: Any = None, bins: int = 50) -> Any:
        """Histograms of max decoder (and encoder) cosine in both directions; returns the Figure."""
        import matplotlib.pyplot as plt

        panels = [("decoder", self.decoder_max_cos_a, self.decoder_max_cos_b)]
        if self.encoder_max_cos_a is not None and self.encoder_max_cos_b is not None:
            panels.append(("encoder", self.encoder_max_cos_a, self.encoder_max_cos_b))
        if axes is None:
            fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3), squeeze=False)
            axes = axes[0]
        fig = axes[0].figure
        edges = np.linspace(-1, 1, bins + 1)
        for ax, (label, a_to_b, b_to_a) in zip(axes, panels, strict=False):
            a, b = self.names
            ax.hist(a_to_b.numpy(), bins=edges, alpha=0.6, label=f"{a} -> {b}")
            ax.hist(b_to_a.numpy(), bins=edges, alpha=0.6, label=f"{b} -> {a}")
            ax.set_xlabel(f"max {label} cosine")
            ax.set_ylabel("latents")
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def plot_matched(self, ax: Any = None, bins: int = 50) -> Any:
        """Histogram of matched-pair cosines (Hungarian; and after Procrustes rotation)."""
        import matplotlib.pyplot as plt

        if self.matching is None:
            raise InterplabError("this comparison was run with hungarian=False: nothing matched.")
        if ax is None:
            _, ax = plt.subplots(figsize=(4.5, 3))
        edges = np.linspace(-1, 1, bins + 1)
        ax.hist(self.matching.score.numpy(), bins=edges, alpha=0.6, label="matched")
        if self.procrustes is not None:
            score = self.procrustes.matching.score.numpy()
            ax.hist(score, bins=edges, alpha=0.6, label="matched after rotation")
        ax.set_xlabel("decoder cosine of matched pair")
        ax.set_ylabel("pairs")
        ax.legend(fontsize=7)
        return ax


def _matching_dict(m: Matching) -> dict[str, list]:
    return {"a": m.rows_a.tolist(), "b": m.cols_b.tolist(), "score": m.score.tolist()}


# ---------------------------------------------------------------------------- pieces
def _unit_rows(w: Tensor) -> Tensor:
    w = w.detach().to("cpu", torch.float64)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _max_cos(
    a: Float[Tensor, "n d"], b: Float[Tensor, "m d"], chunk: int = 2048
) -> tuple[Tensor, Tensor]:
    """For each row of `a` (unit), the max cosine with a row of `b` and its index (chunked)."""
    values, indices = [], []
    for start in range(0, a.shape[0], chunk):
        best = (a[start : start + chunk] @ b.T).max(dim=1)
        values.append(best.values)
        indices.append(best.indices)
    return torch.cat(values).float(), torch.cat(indices)


def hungarian(similarity: Float[Tensor, "n m"]) -> Matching:
    """One-to-one matching maximising the summed similarity (rectangular allowed)."""
    from scipy.optimize import linear_sum_assignment

    sim = similarity.detach().cpu().to(torch.float64)
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    rows_t, cols_t = torch.from_numpy(rows).long(), torch.from_numpy(cols).long()
    return Matching(rows_t, cols_t, sim[rows_t, cols_t].float())


def _procrustes(a: Tensor, b: Tensor) -> tuple[Tensor, float]:
    """R = argmin ||a R - b||_F over orthogonal R, and the residual fraction."""
    from scipy.linalg import orthogonal_procrustes

    rotation, _ = orthogonal_procrustes(a.numpy(), b.numpy())
    r = torch.from_numpy(rotation)
    residual = float((a @ r - b).pow(2).sum() / b.pow(2).sum().clamp_min(1e-300))
    return r, residual


def _latents(d: Dictionary, x: Tensor, batch: int = 4096) -> Tensor:
    with torch.no_grad():
        return torch.cat([d.encode(x[s : s + batch]).double() for s in range(0, x.shape[0], batch)])


def _reconstruct(d: Dictionary, x: Tensor, batch: int = 4096) -> Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            xb = x[s : s + batch]
            out.append(d.decode(d.encode(xb), xb if d.skip else None).double())
    return torch.cat(out)


def _standardise(z: Tensor) -> tuple[Tensor, Tensor]:
    """Columns centred and scaled to unit std (columns with no variance are zeroed)."""
    z = z - z.mean(0)
    std = z.pow(2).mean(0).sqrt()
    alive = std > 0
    return z / std.clamp_min(1e-300) * alive, alive


def _functional(
    a: Dictionary, b: Dictionary, x: Tensor, matching: Matching | None
) -> FunctionalAgreement:
    device = a.W_dec.device
    x = x.to(device=device, dtype=a.W_dec.dtype)
    xa, xb = _reconstruct(a, x).cpu(), _reconstruct(b, x.to(b.W_dec.device)).cpu()
    var_a = (xa - xa.mean(0)).pow(2).sum()
    var_b = (xb - xb.mean(0)).pow(2).sum()
    denom = float((var_a + var_b) / 2)
    fvu = float((xa - xb).pow(2).sum()) / denom if denom > 0 else float("nan")
    cos = torch.nn.functional.cosine_similarity(xa, xb, dim=1, eps=1e-30).mean()

    za, alive_a = _standardise(_latents(a, x).cpu())
    zb, alive_b = _standardise(_latents(b, x.to(b.W_dec.device)).cpu())
    corr = za.T @ zb / x.shape[0]  # Pearson correlation of every pair of latents
    act_matching = hungarian(corr)
    if matching is not None:
        pair_corr = corr[matching.rows_a, matching.cols_b].float()
        both = alive_a[matching.rows_a] & alive_b[matching.cols_b]
        pair_corr = torch.where(both, pair_corr, torch.full_like(pair_corr, float("nan")))
        partner = act_matching.partner_of(a.d_sae)
        agreement = float((partner[matching.rows_a] == matching.cols_b).float().mean())
    else:
        pair_corr, agreement = torch.empty(0), float("nan")
    return FunctionalAgreement(
        n_tokens=int(x.shape[0]),
        reconstruction_fvu=fvu,
        reconstruction_cosine=float(cos),
        matched_correlation=pair_corr,
        activation_matching=act_matching,
        matching_agreement=agreement,
    )


def _pairs(
    source: str,
    unit_a: Tensor,
    unit_b: Tensor,
    matching: Matching | None,
    functional: FunctionalAgreement | None,
) -> tuple[Tensor, Tensor]:
    if source == "index":
        if unit_a.shape[0] != unit_b.shape[0]:
            raise InterplabError(
                f"procrustes_pairs='index' pairs latent i with latent i and needs equal widths, "
                f"got d_sae {unit_a.shape[0]} and {unit_b.shape[0]}."
            )
        idx = torch.arange(unit_a.shape[0])
        return idx, idx
    if source == "activations":
        if functional is None:
            raise InterplabError("procrustes_pairs='activations' needs data=... (activations).")
        m = functional.activation_matching
        return m.rows_a, m.cols_b
    m = matching if matching is not None else hungarian(unit_a @ unit_b.T)
    return m.rows_a, m.cols_b


def _fit_rotation(
    unit_a: Tensor, unit_b: Tensor, rows: Tensor, cols: Tensor, source: str, iterations: int
) -> ProcrustesFit:
    """Procrustes on the initial pairs, then alternate Hungarian re-matching of the rotated
    rows and re-fitting, keeping the fit with the best matched cosine."""
    rotation, residual = _procrustes(unit_a[rows], unit_b[cols])
    matching = hungarian(unit_a @ rotation @ unit_b.T)
    for _ in range(iterations):
        new_rotation, new_residual = _procrustes(unit_a[matching.rows_a], unit_b[matching.cols_b])
        new_matching = hungarian(unit_a @ new_rotation @ unit_b.T)
        if new_matching.mean_score <= matching.mean_score + 1e-9:
            break
        rotation, residual, matching = new_rotation, new_residual, new_matching
    return ProcrustesFit(rotation.float(), source, residual, matching)


# ---------------------------------------------------------------------------- entry points
def compare_dictionaries(
    a: Dictionary,
    b: Dictionary,
    data: Float[Tensor, "n d_in"] | Any | None = None,
    *,
    hungarian_matching: bool = True,
    procrustes: bool = True,
    procrustes_pairs: PairSource = "auto",
    procrustes_iterations: int = 3,
    max_tokens: int = 16_384,
    names: tuple[str, str] = ("a", "b"),
) -> Comparison:
    """Compare dictionaries `a` and `b` (see the module docstring for every quantity).

    Args:
        a, b: dictionaries with the same output width (decoder comparisons) and, for encoder
            and functional comparisons, the same input width.
        data: activations `[n, d_in]` (a tensor, or an `ActivationStore`, of which the first
            `max_tokens` rows are used) for the functional comparison; None skips it.
        hungarian_matching: compute the one-to-one decoder matching (O(d_sae^3) time,
            d_sae_a x d_sae_b memory: about a minute at 16k x 16k).
        procrustes: fit the orthogonal alignment (needs the matching or data for its pairs).
        procrustes_pairs: initial pairs for Procrustes: "matched" (decoder matching),
            "activations" (matching of latent activation correlations on `data`), "index"
            (latent i with latent i: runs from one initialisation, or rotated copies);
            "auto" = "activations" with data, else "matched".
        procrustes_iterations: rounds of re-matching and re-fitting after the first fit.
        max_tokens: rows of `data` used.
        names: labels for tables and plots.
    Returns:
        A `Comparison`.
    """
    for label, d in (("a", a), ("b", b)):
        if not isinstance(d, Dictionary):
            raise InterplabError(
                f"{label} must be an interplab Dictionary, got {type(d).__name__}."
            )
    if a.d_out != b.d_out:
        raise InterplabError(
            f"the dictionaries decode into different spaces (d_out {a.d_out} and {b.d_out}); "
            "decoder directions can only be compared in one space."
        )
    if procrustes_pairs not in ("auto", "matched", "activations", "index"):
        raise InterplabError(
            f"procrustes_pairs must be 'auto', 'matched', 'activations' or 'index', "
            f"got {procrustes_pairs!r}."
        )
    if isinstance(procrustes_iterations, bool) or procrustes_iterations < 0:
        raise InterplabError(f"procrustes_iterations must be >= 0, got {procrustes_iterations!r}.")
    unit_a, unit_b = _unit_rows(a.W_dec), _unit_rows(b.W_dec)
    dec_a, nearest_a = _max_cos(unit_a, unit_b)
    dec_b, _ = _max_cos(unit_b, unit_a)
    enc_a = enc_b = None
    if a.d_in == b.d_in:
        enc_unit_a, enc_unit_b = _unit_rows(a.W_enc.T), _unit_rows(b.W_enc.T)
        enc_a, _ = _max_cos(enc_unit_a, enc_unit_b)
        enc_b, _ = _max_cos(enc_unit_b, enc_unit_a)

    matching = hungarian(unit_a @ unit_b.T) if hungarian_matching else None
    functional = None
    if data is not None:
        if a.d_in != b.d_in:
            raise InterplabError(
                f"functional comparison needs one input space: d_in {a.d_in} and {b.d_in} differ."
            )
        functional = _functional(a, b, _data_rows(data, a.d_in, max_tokens), matching)

    fit = None
    if procrustes:
        source = procrustes_pairs
        if source == "auto":
            source = "activations" if functional is not None else "matched"
        rows, cols = _pairs(source, unit_a, unit_b, matching, functional)
        fit = _fit_rotation(unit_a, unit_b, rows, cols, source, procrustes_iterations)
    return Comparison(
        d_sae_a=a.d_sae,
        d_sae_b=b.d_sae,
        decoder_max_cos_a=dec_a,
        decoder_max_cos_b=dec_b,
        decoder_nearest_a=nearest_a,
        encoder_max_cos_a=enc_a,
        encoder_max_cos_b=enc_b,
        matching=matching,
        procrustes=fit,
        functional=functional,
        names=(str(names[0]), str(names[1])),
    )


def _data_rows(data: Any, d_in: int, max_tokens: int) -> Tensor:
    from interplab.data.activations import ActivationStore

    if isinstance(data, ActivationStore):
        rows, held = [], 0
        hook = data.hooks[0] if len(data.hooks) == 1 else None
        if hook is None:
            raise InterplabError(
                f"the activation store holds {len(data.hooks)} hooks; pass one hook's rows."
            )
        for batch in data.tensors(min(max_tokens, 65_536), shuffle=False):
            rows.append(batch)
            held += batch.shape[0]
            if held >= max_tokens:
                break
        data = torch.cat(rows)
    if not isinstance(data, Tensor):
        raise InterplabError(
            f"data must be activations [n, d_in] (a tensor or an ActivationStore), "
            f"got {type(data).__name__}."
        )
    data = data.reshape(-1, data.shape[-1])[:max_tokens]
    if data.shape[-1] != d_in or data.shape[0] < 2:
        raise InterplabError(
            f"data has shape {tuple(data.shape)}; expected at least 2 rows of width d_in={d_in}."
        )
    return data


@dataclass
class OpposingPairs:
    """Pairs of latents of one dictionary whose decoder rows point in nearly opposite directions."""

    indices: Int[Tensor, "pair 2"]
    """(i, j) with i < j."""
    cosine: Float[Tensor, " pair"]
    """Their decoder cosine (below the threshold), most antipodal first."""

    def __len__(self) -> int:
        return int(self.cosine.numel())


def opposing_pairs(
    dictionary: Dictionary | Float[Tensor, "d_sae d"], threshold: float = -0.9, chunk: int = 2048
) -> OpposingPairs:
    """Latent pairs (i < j) of `dictionary` whose decoder rows have cosine < `threshold`."""
    if not -1 <= threshold < 0:
        raise InterplabError(
            f"threshold must be in [-1, 0) (near-antipodal directions), got {threshold!r}."
        )
    W_dec = dictionary.W_dec if isinstance(dictionary, Dictionary) else dictionary
    if not isinstance(W_dec, Tensor) or W_dec.ndim != 2:
        raise InterplabError("opposing_pairs needs a Dictionary or a decoder matrix [d_sae, d].")
    unit = _unit_rows(W_dec)
    found_i, found_j, found_c = [], [], []
    for start in range(0, unit.shape[0], chunk):
        sims = unit[start : start + chunk] @ unit.T
        i, j = (sims < threshold).nonzero(as_tuple=True)
        i = i + start
        keep = i < j
        found_i.append(i[keep])
        found_j.append(j[keep])
        found_c.append(sims[i[keep] - start, j[keep]])
    cos = torch.cat(found_c).float()
    order = cos.argsort()
    pairs = torch.stack([torch.cat(found_i), torch.cat(found_j)], dim=1)[order]
    return OpposingPairs(pairs, cos[order])


__all__ = [
    "Comparison",
    "FunctionalAgreement",
    "Matching",
    "OpposingPairs",
    "ProcrustesFit",
    "compare_dictionaries",
    "hungarian",
    "opposing_pairs",
]
