"""Reading results: Pareto fronts and hypervolumes (`fronts`), the comparison at each budget (`budgets`), plots
(`plots`), the MLflow review pages (`review`) and a study's record in MLflow (`store`)."""
