"""Reports: what `galore-train report` makes of finished (or unfinished) runs.

runs: a run folder or a W&B CSV export read into `Run`s; cells: runs grouped into the paper's Table 2 cells
(seeds share a cell); report: the markdown tables and CSV; plots: validation perplexity and memory by component.
"""
