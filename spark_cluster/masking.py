"""Secrets masked where they are written: one function for text, one for JSON-shaped data.

The values come from ClusterConfig.secret_values() (secret variables, the values of secret flags
in extra_args, the engine's API key) and, in the controller, its API token. Every file under
state_dir, every event, every API answer, `status` and `plan` pass through here.
"""

from __future__ import annotations

from typing import Any, Sequence

MASK = "********"


def mask(text: str, values: Sequence[str]) -> str:
    """text with every secret value replaced by MASK (values longest first: a secret containing
    another is masked whole)."""
    for v in values:
        if v and v in text:
            text = text.replace(v, MASK)
    return text


def mask_data(data: Any, values: Sequence[str]) -> Any:
    """Every string in a JSON-shaped value (dict keys too) masked; other values as they are."""
    if not values:
        return data
    if isinstance(data, str):
        return mask(data, values)
    if isinstance(data, dict):
        return {mask_data(k, values): mask_data(v, values) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [mask_data(x, values) for x in data]
    return data
