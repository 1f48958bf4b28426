"""Baselines evaluated with the same protocol, metrics and filter modes as TDM."""
