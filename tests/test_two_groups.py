"""The headline of several groups, in `make test`: four simulated nodes as two groups of TP=2 behind
one controller (its own process), a frozen rank in group a under load through the gateway. On Ray;
both executors and the rolling change: `make test-scale` (tests/test_scale.py). Runs last in the
session: the two-node engine leaves sim-1 and sim-2 to group a (conftest's sim4)."""

from __future__ import annotations

import pytest

from .two_groups import a_frozen_rank_costs_clients_nothing, two_groups_serving

pytestmark = pytest.mark.cluster


def test_a_frozen_rank_in_one_group_costs_clients_nothing_and_the_other_group_is_untouched(sim4, tmp_path):
    with two_groups_serving(tmp_path, "ray") as (_, cfg, c):
        a_frozen_rank_costs_clients_nothing(c, cfg)
