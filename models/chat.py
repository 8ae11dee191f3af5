"""Chat prompts as a model sees them."""

from __future__ import annotations


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The chat as the prompted baseline sees it: its system prompt first, merged with the user's own
    system message if there is one (a chat template may take only one)."""
    if not system_prompt:
        return messages
    if messages and messages[0].get("role") == "system":
        merged = f"{system_prompt}\n\n{messages[0].get('content', '')}"
        return [{"role": "system", "content": merged}, *messages[1:]]
    return [{"role": "system", "content": system_prompt}, *messages]
