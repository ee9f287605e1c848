"""Toy models whose answers are known, for checking interpretability methods.

Import the submodule you need, e.g. `from interplab.toys import superposition` (toy models
of superposition, Elhage et al. 2022). Nothing is imported here, so `import interplab.toys`
stays cheap (no torch).

- `attention_superposition`: skip-trigram tasks with more features than heads
  (OV-incoherent / OV-coherent), one-layer attention-only models, per-feature head
  attribution and QK/OV interference.
- `hierarchy`: parent/child features with known co-occurrence, Park et al.'s geometry
  checks, and SAE absorption/splitting metrics against the ground truth.
"""
