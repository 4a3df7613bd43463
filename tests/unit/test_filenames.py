from __future__ import annotations

import pytest

from gateway.ingest.filenames import MAX_NAME_CHARS, safe_filename


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("frame_0001.jpg", "frame_0001.jpg"),
        ("../../etc/passwd", "passwd"),
        ("C:\\images\\cam1\\a.png", "a.png"),
        ("..", "image.jpg"),
        ("", "image.jpg"),
        (None, "image.jpg"),
        ("a..b.jpg", "a.b.jpg"),
        ("bad\r\nX-Injected: 1.jpg", "bad_X-Injected_1.jpg"),
        ('q"uote;.jpg', "q_uote_.jpg"),
        ("\x00\x01\x7f", "image.jpg"),
        ("kamera-ä.jpg", "kamera-ä.jpg"),
    ],
)
def test_safe_filename(raw: str | None, expected: str) -> None:
    assert safe_filename(raw, "image/jpeg") == expected


def test_empty_png_name() -> None:
    assert safe_filename("", "image/png") == "image.png"


def test_length_bounded_and_extension_kept() -> None:
    name = safe_filename("x" * 500 + ".jpeg", "image/jpeg")
    assert len(name) <= MAX_NAME_CHARS and name.endswith(".jpeg")


@pytest.mark.parametrize("raw", ["../a", "a/../b", "/abs/path.jpg", "x\\..\\y.jpg", "...", ". .", "a\u202eb.jpg"])
def test_never_unsafe(raw: str) -> None:
    name = safe_filename(raw, "image/jpeg")
    assert "/" not in name and "\\" not in name and ".." not in name
    assert all(ch.isprintable() for ch in name) and name
