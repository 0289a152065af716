"""Property-based tests: arbitrary bytes into the decoder, and the service against its own schema."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from models.errors import FerError
from models.preprocessing import PreprocessingSpec, preprocess_bytes
from tests.conftest import make_face
from tests.server import AppServer

SPEC = PreprocessingSpec()
SEEDS = [
    (lambda fmt: (lambda b: (make_face(0).save(b, format=fmt), b.getvalue())[1])(io.BytesIO()))(fmt)
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
]


def assert_only_documented_errors(data: bytes) -> None:
    try:
        tensor = preprocess_bytes(data, SPEC, max_pixels=4_000_000)
    except FerError:
        return
    assert tensor.shape == (1, 48, 48)
    assert np.isfinite(tensor).all()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_domain_errors(data: bytes) -> None:
    assert_only_documented_errors(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_mutated_real_images_raise_only_domain_errors(
    seed: bytes, flips: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    assert_only_documented_errors(bytes(data))


def test_seeds_are_valid_images() -> None:
    for data in SEEDS:
        assert Image.open(io.BytesIO(data)).size == (48, 48)


def test_every_route_honours_its_schema(server: AppServer) -> None:
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    # Not positive_data_acceptance: the schema cannot say which bytes are a decodable image,
    # so schema-valid garbage rightly gets a documented 4xx.
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: list[str] = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def run(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(base_url=server.url)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path}: {response.status_code} {response.text[:200]}")
            case.validate_response(response, checks=checks)

        run()
    assert not failures, failures
    assert "Traceback" not in server.log()
