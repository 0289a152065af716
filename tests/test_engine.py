"""The engine, the serving façade: which uploads it prepares inline, and what its calls return."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.workloads import face_jpeg_48, photo_jpeg_640
from models.answers import ImageAnswer
from models.checkpoint import read_checkpoint_dict, write_checkpoint_dict
from models.config import EngineConfig
from models.decoding import read_header
from models.engine import Engine
from models.errors import InvalidImageError, NoFaceError, NotMeasuredError
from models.scheduling import INLINE_MAX_BYTES, runs_inline
from tests.conftest import SHIPPED_CHECKPOINT, make_face
from tests.images import encode, face_png, scene_with_face


def inline(data: bytes) -> bool:
    return runs_inline(data, read_header(data))


def test_small_face_crops_are_prepared_inline() -> None:
    assert inline(face_jpeg_48())
    assert inline(encode(make_face(3, size=64)))


def test_photos_go_to_a_worker_thread() -> None:
    assert not inline(photo_jpeg_640())  # face detection: tens of ms
    assert not inline(encode(make_face(3, size=100)))  # shorter side over 64: detection runs


def test_a_small_file_claiming_many_pixels_goes_to_a_worker_thread() -> None:
    data = encode(Image.new("1", (3000, 3000)))  # a few KB that decode to 9 megapixels
    assert len(data) < INLINE_MAX_BYTES
    assert not inline(data)


def test_undecodable_and_oversized_bytes_are_not_prepared_inline() -> None:
    assert not inline(b"not an image at all")
    assert not inline(b"")
    assert not inline(face_jpeg_48() + b"\0" * INLINE_MAX_BYTES)


# The façade: what one call returns for the kinds of uploads the service sees.


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    loaded = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(precision="fp32", threads=1, prepare_workers=1))
    yield loaded
    loaded.close()


def test_a_face_crop_is_classified_whole_with_the_served_mode(engine: Engine) -> None:
    answer = asyncio.run(engine.classify(face_png(1)))
    assert answer.tta == engine.model.tta == "none"
    (face,) = answer.faces
    assert face.box is None and face.batch_size == 1
    assert list(face.prediction.probabilities) == list(engine.model.classes)
    assert sum(face.prediction.probabilities.values()) == pytest.approx(1.0)


def test_every_face_of_a_photo_comes_back_largest_first(engine: Engine) -> None:
    small, _ = scene_with_face(left=100, top=150, side=70)
    large, (x, y, w, h) = scene_with_face(left=380, top=150, side=140)
    picture = Image.open(io.BytesIO(large))
    picture.paste(Image.open(io.BytesIO(small)).crop((20, 90, 230, 330)), (20, 90))  # the small face, left
    answer = asyncio.run(engine.classify(encode(picture, "JPEG", quality=92), all_faces=True, require_face=True))
    boxes = [face.box for face in answer.faces]
    assert len(boxes) == 2 and all(boxes)
    bx, by, bw, _ = boxes[0].as_list()  # type: ignore[union-attr]
    assert abs(bx - x) <= 0.15 * w and abs(by - y) <= 0.15 * h and abs(bw - w) <= 0.2 * w
    assert boxes[1].x < 250 and boxes[1].area < boxes[0].area  # type: ignore[union-attr]


def test_a_request_may_ask_for_another_tta_mode(engine: Engine) -> None:
    plain = asyncio.run(engine.classify(face_png(5)))
    tencrop = asyncio.run(engine.classify(face_png(5), tta="tencrop"))
    assert tencrop.tta == "tencrop"
    assert tencrop.faces[0].prediction.probabilities != pytest.approx(plain.faces[0].prediction.probabilities)


def test_bad_uploads_raise_domain_errors(engine: Engine) -> None:
    with pytest.raises(InvalidImageError):
        asyncio.run(engine.classify(b"not an image"))
    with pytest.raises(NoFaceError):
        asyncio.run(engine.classify(encode(Image.new("RGB", (300, 300), (90, 90, 90))), require_face=True))


def test_a_batch_answers_in_order_with_each_bad_upload_in_its_place(engine: Engine) -> None:
    answers = asyncio.run(engine.classify_batch([face_png(1), b"junk", face_png(2)]))
    assert isinstance(answers[0], ImageAnswer) and isinstance(answers[2], ImageAnswer)
    assert isinstance(answers[1], InvalidImageError)
    alone = asyncio.run(engine.classify(face_png(2)))
    assert answers[2].faces[0].prediction.probabilities == pytest.approx(alone.faces[0].prediction.probabilities)


def test_stored_figures_are_served_per_mode_and_unmeasured_modes_are_refused(engine: Engine, tmp_path: Path) -> None:
    assert engine.metrics()["accuracy"] == engine.metrics("none")["accuracy"]
    assert engine.metrics("tencrop")["tta"] == "tencrop"
    payload = read_checkpoint_dict(SHIPPED_CHECKPOINT)
    payload["metrics"].pop("tta_alternatives")
    for block in payload["metrics"].get("precision_alternatives", {}).values():
        block.pop("tta_alternatives", None)
    write_checkpoint_dict(payload, tmp_path / "plain.pth")
    plain = Engine.load(tmp_path / "plain.pth", EngineConfig(threads=1, prepare_workers=1))
    try:
        assert plain.model.measured_tta == ("none",)
        with pytest.raises(NotMeasuredError, match="--also-tta tencrop"):
            plain.metrics("tencrop")
    finally:
        plain.close()
