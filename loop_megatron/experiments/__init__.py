"""Experiment bookkeeping: reading finished training runs back and turning them into tables, plots and
budgets. `records` loads run folders and `tools/evaluate.py --json` files, `tables` writes the Markdown
tables, `plots` the matplotlib figures, `report` puts both into a results folder, `budget` fits iteration
counts to a time budget, and `cli` is the command line of `tools/plot_runs.py` and
`launch/run_small_experiments.sh`. Nothing here trains; it only reads what the trainer and the
evaluator wrote.
"""
