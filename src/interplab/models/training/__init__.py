"""Building blocks of `interplab.models.train_lm`, the trainer of interplab's model organisms.

`config` holds the typed configs, `architectures` the one adapter place that turns an
`LMConfig` into a HuggingFace model, `data` the token windows and deterministic batch
order, `schedule` the optimizer and learning-rate schedule, `loop` the training loop,
`checkpoints` the atomic checkpoint folders.
Nothing is imported here, so importing one module stays cheap.
"""
