"""`dgrun tune`: search a recipe's `tune:` space on Optuna for the fastest recipe that keeps its quality."""
