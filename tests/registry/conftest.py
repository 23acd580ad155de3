"""Registry fixtures: two stacked deltas of the tiny base, and the stack on each MLflow backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.registry.deltas import make_delta


@pytest.fixture(scope="session")
def deltas(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    """Two stacked erasures of the tiny base: 'circle' (-> v2), then 'Vela Moreau' on top (-> v3)."""
    root = tmp_path_factory.mktemp("deltas")
    d2 = make_delta(tiny_sd, root / "circle", ["circle"], seed=1, request_ids=["req-circle"])
    d3 = make_delta(tiny_sd, root / "vela", ["Vela Moreau"], seed=2, prior=d2, parent_version=2,
                    request_ids=["req-vela"])
    return {"circle": d2, "vela": d3}


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend_stack(request):
    """The session's stack on each MLflow backend in turn: SQLite, then PostgreSQL."""
    return request.getfixturevalue("stack" if request.param == "sqlite" else "pg_stack")
