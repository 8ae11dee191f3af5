"""Custom reward callables used by the tests (configured by import path, as a deployment would)."""


def exclamation_count(prompt: str, response: str) -> float:
    return float(response.count("!"))


def batched_length(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) for r in responses]


def broken(prompt: str, response: str) -> float:
    raise RuntimeError("the reward backend is down")
