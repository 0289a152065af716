"""The photo path: the detector, framing, reduced-scale decoding, the face policy, phone formats."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from models.checkpoint import SHIPPED_CHECKPOINT
from models.config import ENGINE_DEFAULTS, EngineConfig
from models.decoding import decode_image, decode_photo
from models.engine import Engine
from models.errors import DetectorError, ImageTooLargeError, NoFaceError
from models.faces import DetectedFace, FaceBox, Framing, crop_geometry, detect_faces, frame_face
from models.preprocessing import to_rgb
from models.yunet import MODEL_FILE, YuNetDetector
from tests.conftest import ROOT
from tests.images import astronaut_head, encode


@pytest.fixture(scope="module")
def detector() -> YuNetDetector:
    return YuNetDetector()


def scene(size: tuple[int, int], heads: list[tuple[int, int, int]]) -> Image.Image:
    """A grey scene with a head pasted per (left, top, face side): its face box starts at (left, top)."""
    picture = Image.new("RGB", size, (120, 130, 140))
    for left, top, side in heads:
        picture.paste(astronaut_head(side), (left - side // 2, top - side // 2))
    return picture


@pytest.mark.parametrize(("side", "left", "top"), [(60, 500, 60), (110, 380, 150), (220, 120, 180)])
def test_the_detector_finds_a_face_where_it_was_pasted(detector: YuNetDetector, side: int, left: int, top: int) -> None:
    picture = scene((800, 600), [(left, top, side)])
    (face,) = detect_faces(detector, np.asarray(picture), detect_max_side=800)
    box = face.box
    assert abs(box.x + box.width / 2 - (left + side / 2)) <= 0.15 * side
    assert abs(box.y + box.height / 2 - (top + side / 2)) <= 0.2 * side
    assert 0.75 * side <= box.width <= 1.25 * side
    assert face.score >= 0.9 and face.landmarks is not None and len(face.landmarks) == 5
    (right_eye_x, _), (left_eye_x, _) = face.landmarks[0], face.landmarks[1]
    assert right_eye_x < left_eye_x  # the person's right eye is on the image's left


def test_the_detector_finds_a_face_turned_by_twenty_degrees(detector: YuNetDetector) -> None:
    picture = scene((640, 640), [(270, 270, 120)]).rotate(20, center=(330, 330), fillcolor=(120, 130, 140))
    (face,) = detect_faces(detector, np.asarray(picture), detect_max_side=640)
    assert abs(face.box.x + face.box.width / 2 - 330) <= 25 and abs(face.box.y + face.box.height / 2 - 330) <= 30
    (rx, ry), (lx, ly) = face.landmarks[:2]  # type: ignore[index]
    # Turned counter-clockwise on screen, the eye line climbs to the right (YuNet's landmarks
    # follow the turn only in part: about 9° of the 20 here).
    assert -30 <= math.degrees(math.atan2(ly - ry, lx - rx)) <= -5


def test_yunet_in_onnx_runtime_finds_the_faces_opencv_finds(detector: YuNetDetector) -> None:
    """The service runs YuNet without OpenCV: the same boxes, landmarks and scores as `cv2.FaceDetectorYN`."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV (the haar extra) is the reference: pip install -e '.[haar]'")
    from models.yunet import NMS_THRESHOLD, SCORE_THRESHOLD, TOP_K

    pictures = [
        np.asarray(scene((800, 600), [(500, 60, 60), (120, 180, 220)])),
        np.asarray(scene((641, 479), [(300, 200, 110)]).rotate(20, fillcolor=(120, 130, 140))),  # not a multiple of 32
        np.asarray(Image.open(ROOT / "tests" / "data" / "astronaut.jpg").convert("RGB")),
        np.full((240, 320, 3), 128, np.uint8),
    ]
    if KDEF.is_dir():  # and 42 real photos, frontal and half profile, where kdef-dev is here
        photos = sorted(KDEF.glob("*/*.JPG"))[::20]
        pictures += [np.asarray(to_rgb(decode_photo(p.read_bytes(), max_side=640).image)) for p in photos]
    reference = cv2.FaceDetectorYN.create(str(MODEL_FILE), "", (320, 320), SCORE_THRESHOLD, NMS_THRESHOLD, TOP_K)
    found_any = 0
    for rgb in pictures:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        height, width = bgr.shape[:2]
        reference.setInputSize((width, height))
        rows = reference.detect(bgr)[1]
        expected = [] if rows is None else list(rows)
        ours = detector.detect(bgr)
        assert len(ours) == len(expected)
        for face, row in zip(ours, expected, strict=True):
            assert face.box == FaceBox.from_float(*map(float, row[:4]), width, height)
            assert np.allclose(np.ravel(face.landmarks), row[4:14], atol=1e-3) and abs(face.score - row[14]) < 1e-4
        found_any += len(ours)
    assert found_any >= 3


def test_a_grey_scene_has_no_face(detector: YuNetDetector) -> None:
    assert detect_faces(detector, np.full((480, 640, 3), 128, np.uint8), detect_max_side=320) == []


def synthetic_face(angle: float) -> tuple[np.ndarray, DetectedFace]:
    """A 400×400 image with two bright 'eyes' 100 px apart around (200, 200), turned by `angle` degrees."""
    gray = np.zeros((400, 400), np.uint8)
    rad = math.radians(angle)
    eyes = [(200 + dx * math.cos(rad), 200 + dx * math.sin(rad)) for dx in (-50, 50)]
    picture = Image.fromarray(gray)
    for x, y in eyes:
        ImageDraw.Draw(picture).ellipse((round(x) - 6, round(y) - 6, round(x) + 6, round(y) + 6), fill=255)
    gray = np.asarray(picture)
    mouth = [(200 - 30, 280), (200 + 30, 280)]
    landmarks = (eyes[0], eyes[1], (200.0, 240.0), (float(mouth[0][0]), 280.0), (float(mouth[1][0]), 280.0))
    return gray, DetectedFace(FaceBox(100, 100, 200, 200), 0.99, landmarks)


def test_framing_is_a_square_scaled_from_the_box_and_moved_by_the_shift() -> None:
    _, face = synthetic_face(0)
    (cx, cy), side, angle = crop_geometry(face, Framing("box", 0.9, -0.05))
    assert side == pytest.approx(180) and angle == 0
    assert (cx, cy) == pytest.approx((200, 200 - 0.05 * 180))
    crop = frame_face(np.zeros((400, 400), np.uint8), face, Framing("box", 0.9, -0.05))
    assert crop.size == (180, 180)


@pytest.mark.parametrize("angle", [-25.0, 15.0])
def test_levelling_puts_the_eyes_on_one_row(angle: float) -> None:
    gray, face = synthetic_face(angle)
    for level, expect_level in ((True, True), (False, False)):
        crop = np.asarray(frame_face(gray, face, Framing("box", 1.0, 0.0, level_eyes=level)))
        ys, xs = np.nonzero(crop > 128)
        left, right = ys[xs < crop.shape[1] / 2].mean(), ys[xs >= crop.shape[1] / 2].mean()
        assert (abs(left - right) <= 2) == expect_level


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    loaded = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(precision="fp32", threads=1, prepare_workers=1))
    yield loaded
    loaded.close()


def test_a_large_jpeg_decoded_at_reduced_scale_gives_the_same_face(engine: Engine) -> None:
    picture = scene((1000, 750), [(420, 230, 160)]).resize((4000, 3000), Image.Resampling.BICUBIC)
    data = encode(picture, "JPEG", quality=92)
    drafted = decode_photo(data, max_side=960)
    assert drafted.scale == 4 and drafted.image.size == (1000, 750) and drafted.full_size == (4000, 3000)
    full = Engine.load(
        SHIPPED_CHECKPOINT, EngineConfig(precision="fp32", threads=1, prepare_workers=1, decode_max_side=10**5)
    )
    try:
        small = asyncio.run(engine.classify(data)).faces[0]
        whole = asyncio.run(full.classify(data)).faces[0]
    finally:
        full.close()
    assert small.box is not None and whole.box is not None
    for a, b in zip(small.box.as_list(), whole.box.as_list(), strict=True):
        assert abs(a - b) <= 0.03 * whole.box.width  # in the upload's pixels either way
    assert small.prediction.probabilities == pytest.approx(whole.prediction.probabilities, abs=0.05)


def test_a_turned_phone_photo_decoded_at_reduced_scale_gives_the_box_in_upright_upload_pixels() -> None:
    upright = scene((1000, 750), [(420, 230, 160)]).resize((4000, 3000), Image.Resampling.BICUBIC)
    stored = upright.rotate(90, expand=True)  # as the sensor saw it: 3000×4000, to be turned back by EXIF 6
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=90, exif=exif)
    photo = decode_photo(buffer.getvalue(), max_side=960)
    assert photo.scale == 4 and photo.full_size == (4000, 3000)
    config = EngineConfig(threads=1, prepare_workers=1, min_face_px=900)  # in the upload's pixels
    strict = Engine.load(SHIPPED_CHECKPOINT, config)
    lenient = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(threads=1, prepare_workers=1, min_face_px=300))
    try:
        found = asyncio.run(lenient.classify(buffer.getvalue()))
        too_small = asyncio.run(strict.classify(buffer.getvalue()))
    finally:
        strict.close()
        lenient.close()
    box = found.faces[0].box
    assert box is not None  # the face is about 640 px wide in the upload, 160 in the decoded image
    assert abs(box.x + box.width / 2 - 4 * (420 + 80)) <= 0.15 * 640
    assert abs(box.y + box.height / 2 - 4 * (230 + 80)) <= 0.2 * 640
    assert 0.75 * 640 <= box.width <= 1.25 * 640
    assert too_small.search is not None and too_small.search.no_face_reason == "too_small"


def test_a_crowd_is_capped_and_the_answer_says_how_many_were_left_out(engine: Engine) -> None:
    heads = [(60 + 190 * (i % 5), 60 + 230 * (i // 5), 100) for i in range(10)]
    data = encode(scene((1000, 520), heads), "JPEG", quality=92)
    capped = Engine.load(
        SHIPPED_CHECKPOINT, EngineConfig(threads=1, prepare_workers=1, max_faces=3, detect_max_side=1000)
    )
    try:
        answer = asyncio.run(capped.classify(data, all_faces=True))
    finally:
        capped.close()
    assert answer.search is not None
    assert (len(answer.faces), answer.search.found, answer.search.dropped) == (3, 10, 7)


def test_faces_under_the_minimum_size_are_not_classified_and_the_answer_says_why(engine: Engine) -> None:
    data = encode(scene((800, 600), [(380, 250, 60)]), "JPEG", quality=92)
    config = EngineConfig(threads=1, prepare_workers=1, min_face_px=100, detect_max_side=800)
    strict = Engine.load(SHIPPED_CHECKPOINT, config)
    try:
        answer = asyncio.run(strict.classify(data))
        with pytest.raises(NoFaceError, match="smaller than 100 px"):
            asyncio.run(strict.classify(data, require_face=True))
    finally:
        strict.close()
    assert answer.search is not None and answer.search.no_face_reason == "too_small"
    assert answer.faces[0].box is None  # the whole image was classified
    nothing = asyncio.run(engine.classify(encode(Image.new("RGB", (300, 300), (90, 90, 90)))))
    assert nothing.search is not None and nothing.search.no_face_reason == "none_found"


def test_a_face_crop_is_not_searched(engine: Engine) -> None:
    crop = astronaut_head(60).resize((64, 64))
    answer = asyncio.run(engine.classify(encode(crop)))
    assert answer.search is None and answer.faces[0].box is None


def test_a_missing_or_damaged_detector_model_is_refused_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match="cannot be read") as missing:
        YuNetDetector(tmp_path / "absent.onnx")
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(MODEL_FILE.read_bytes()[:-100])
    with pytest.raises(DetectorError, match="is not the shipped file's") as wrong:
        YuNetDetector(damaged)
    assert "\n" not in str(missing.value) and "\n" not in str(wrong.value)


def test_start_up_stops_with_one_line_when_the_detector_model_is_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.__main__ import main

    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"not an onnx file")
    monkeypatch.setenv("FER_DETECTOR_MODEL", str(damaged))
    assert main() == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "face detector model" in err and str(damaged) in err


def oriented_jpeg_like(fmt: str) -> bytes:
    """A 300×200 picture with a dark left half, saved as `fmt` with EXIF orientation 6 (turn 90° clockwise)."""
    picture = Image.new("RGB", (300, 200), (230, 230, 230))
    picture.paste((20, 20, 20), (0, 0, 150, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    if fmt == "MPO":
        picture.save(buffer, "MPO", save_all=True, append_images=[picture.resize((60, 40))], exif=exif)
    else:
        picture.save(buffer, fmt, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["MPO", "AVIF"])
def test_phone_formats_are_decoded_upright_with_the_pixel_limit(fmt: str) -> None:
    data = oriented_jpeg_like(fmt)
    image = decode_image(data)
    assert image.size == (200, 300)  # turned upright
    pixels = np.asarray(to_rgb(image))
    assert pixels[:100].mean() < 80 < 180 < pixels[200:].mean()  # the dark half went to the top, as 6 says
    with pytest.raises(ImageTooLargeError, match="over the limit of 50,000"):
        decode_image(data, max_pixels=50_000)


def test_heic_is_decoded_with_the_pixel_limit() -> None:
    # HEIC stores orientation as transform boxes (irot, imir) that libheif applies while decoding,
    # as iPhones write them; pillow-heif then resets the EXIF tag so nothing turns it twice.
    picture = astronaut_head(100).resize((300, 200))
    data = encode(picture, "HEIF", quality=90)
    image = decode_image(data)
    assert Image.open(io.BytesIO(data)).format == "HEIF" and image.size == (300, 200)
    assert np.abs(np.asarray(to_rgb(image), np.int16) - np.asarray(picture, np.int16)).mean() < 8
    with pytest.raises(ImageTooLargeError, match="over the limit of 50,000"):
        decode_image(data, max_pixels=50_000)


KDEF = Path(os.environ.get("KDEF_DIR", str(ROOT.parent / "shared" / "datasets" / "kdef-dev")))


def kdef_dir() -> Path:
    if not KDEF.is_dir():
        pytest.skip(f"KDEF_DIR={KDEF} does not exist: the real-photo detection check needs kdef-dev")
    return KDEF


@pytest.mark.slow
def test_a_face_is_found_in_nearly_every_kdef_dev_photo_at_every_angle(detector: YuNetDetector) -> None:
    paths = sorted(kdef_dir().glob("*/*.JPG"))

    def faces_in(path: Path) -> int:
        photo = decode_photo(path.read_bytes(), max_side=ENGINE_DEFAULTS.decode_max_side)  # as the engine does
        return len(detect_faces(detector, np.asarray(to_rgb(photo.image)), ENGINE_DEFAULTS.detect_max_side))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # one photo a core, as the engine's pool runs them
        counts = list(pool.map(faces_in, paths))
    found: dict[str, list[int]] = {"S": [], "HL": [], "HR": []}
    for path, count in zip(paths, counts, strict=True):
        found[path.stem[6:]].append(int(count > 0))
    assert all(len(hits) == 280 for hits in found.values())
    for angle, hits in found.items():
        assert sum(hits) / len(hits) >= 0.99, angle
    assert sum(max(0, count - 1) for count in counts) == 0  # no second face in a one-person photo


def test_the_haar_option_works_on_opencv_4_and_is_refused_in_one_line_on_5() -> None:
    from models.detectors import build_detector

    cv2 = pytest.importorskip("cv2", reason="OpenCV is the haar extra's: pip install -e '.[haar]'")
    if hasattr(cv2, "CascadeClassifier"):
        picture = scene((800, 600), [(380, 200, 140)])
        found = detect_faces(build_detector("haar"), np.asarray(picture), detect_max_side=400)
        assert found and found[0].landmarks is None
    else:
        with pytest.raises(DetectorError, match="needs OpenCV 4.x") as refused:
            build_detector("haar")
        assert "\n" not in str(refused.value)
