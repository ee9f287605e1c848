"""Singular learning theory: the local learning coefficient (LLC) estimated with SGLD
(Lau et al. 2023), and models whose learning coefficient is known in closed form."""

from interplab.slt.known import (
    KnownCoefficient,
    NormalCrossing,
    ReducedRankRegression,
    aoyagi_rrr,
    gaussian_nll,
    gaussian_regression_data,
    quadrature_llc,
    regression_loss,
    rrr_teacher,
    sgld_quadratic_llc,
)
from interplab.slt.llc import LLCConfig, LLCResult, default_beta, estimate_llc

__all__ = [
    "KnownCoefficient",
    "LLCConfig",
    "LLCResult",
    "NormalCrossing",
    "ReducedRankRegression",
    "aoyagi_rrr",
    "default_beta",
    "estimate_llc",
    "gaussian_nll",
    "gaussian_regression_data",
    "quadrature_llc",
    "regression_loss",
    "rrr_teacher",
    "sgld_quadratic_llc",
]
