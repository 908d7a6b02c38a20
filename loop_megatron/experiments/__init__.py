"""Experiments: reading finished training runs back and turning them into tables and plots, and the
"does looping pay?" study. `records` loads run folders and `tools/evaluate.py --json` files, `tables`
writes the Markdown tables, `plots` the matplotlib figures, `report` puts both into a results folder and
`cli` is the command line of `tools/plot_runs.py`; `study` drives the seeded study grid (data, LR choice,
training, evaluation; `make experiments`) and `study_report` turns its runs into tables, plots and the
README's Results block.
"""
