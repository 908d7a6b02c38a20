"""Experiments: reading finished training runs back and turning them into tables and plots, a small public
analysis API. `records` loads run folders, their files (`read_json`, `read_yaml`, `read_jsonl`) and
`tools/evaluate.py --json` files, `tables` writes the Markdown tables, `plots` the matplotlib figures
(`pyplot`, `save_figure` and the test-time compute curve of `tools/evaluate.py --plot`), `report` puts
both into a results folder, `cli` is the command line of `tools/plot_runs.py`, and `driver` runs a study's
training and evaluation subprocesses resumably (`StudyDriver`). Studies built on it (the "does looping
pay?" study, `make experiments`, and the reasoning study, `make reasoning`) live beside the library, in
studies/.
"""
