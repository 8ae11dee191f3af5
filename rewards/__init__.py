"""Rewards: one interface for classifier, implicit and programmatic rewards, by name."""
