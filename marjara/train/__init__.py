"""Training: the run's configuration (flags and DeepSpeed JSON merged once), optimizer and
schedule, EMA, metrics, and the loop with its collaborators."""
