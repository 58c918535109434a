"""Running: the typed configuration (`config`) and the checks of names and addresses (`inputs`), stop signals
(`signals`), MLflow: the run schema (`schema`) and the store (`tracking`), and what the terminal shows (`console`,
`watch`)."""
