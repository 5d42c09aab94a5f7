"""Memory: how much a run needs and how much it used.

estimate: the estimator, from a model config alone (what `galore-train memory` prints); tables: its tables and
the paper's Table 2 reproduced; comm: the gradient bytes each step synchronises (`memory --comm`); meter: what a
run measures per logging window; fit: the estimate against a GPU's free memory before a run builds its model.
"""
