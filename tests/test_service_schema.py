"""Schemathesis against the running service's own OpenAPI schema: no 5xx, no schema violation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service_fixtures import Server, wait_job, write_tiny

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    base = tmp_path_factory.mktemp("schema")
    write_tiny(base / "data", "tiny")
    with Server(base / "data", base / "state") as srv:
        with srv.client() as http:
            # one finished job, so listings and artifacts hold real records
            job = http.post("/jobs", json={"dataset": "tiny", "hidden": 3, "max_iter": 3}).json()
            wait_job(http, job["id"])
        yield schemathesis.openapi.from_url(srv.url + "/openapi.json")


# Sampling photograph patches does real work sized by the request; it is tested on its own.
schema = schemathesis.pytest.from_fixture("api_schema").exclude(
    method="POST", path="/datasets/photographs"
)


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_conforms_to_its_schema(case):
    case.call_and_validate(checks=CHECKS)
