"""Toy models whose answers are known, for checking interpretability methods.

Import the submodule you need, e.g. `from interplab.toys import superposition` (toy models
of superposition, Elhage et al. 2022). Nothing is imported here, so `import interplab.toys`
stays cheap (no torch).
"""
