"""Where looping pays: the reasoning study. `study` (the driver: task data, LR per arm, training, accuracy
evaluation) and `report` (its tables, figures, claims and the README block). See README.md beside this file."""
