"""Reward callables for tests/test_train.py (configured by import path through ALIGND_REWARDS, as a
deployment would): they tell a tiny random model's samples apart, where the built-in rewards tie."""


def distinct_characters(prompt: str, response: str) -> float:
    """The number of different characters in the response: differs between random samples."""
    return float(len(set(response)))


def constant(prompt: str, response: str) -> float:
    """The same score for every answer: every prompt's samples tie."""
    return 1.0
