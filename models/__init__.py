"""The training worker: preprocess/cache -> train -> evaluate -> metrics (torch/timm live only here).

Entry points: `python -m models.run RUN_DIR/spec.json` (or under torchrun), `models.run.run_spec`,
`models.predict.predict_file`. Importing this package imports nothing heavy.
"""
