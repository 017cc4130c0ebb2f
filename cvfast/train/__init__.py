"""Training: splitters, schedules (as data), recipes, learner factories, export and resume."""
