"""Difficulty sampling: k rollouts per question sort a dataset into easy / medium / hard."""
