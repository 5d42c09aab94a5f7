"""How the target weights are stored and updated: INT8 with per-group scales and stochastic rounding
(`int8.py` the codes, `int8_linear.py` the layer, `stepping.py` the update, `export.py` checkpoints), the
options' checks (`options.py`) and their bytes for the estimator (`estimate.py`). See docs/int8.md.

Nothing is imported here: config.py imports options.py, which must not pull in the model code."""
