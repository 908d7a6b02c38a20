"""The "does looping pay?" study: `study` (the driver: data, LR choice, training, evaluation) and `report`
(its tables, figures, claims and the README's Results block). See README.md beside this file."""
