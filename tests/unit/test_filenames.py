from __future__ import annotations

import pytest

from gateway.ingest.filenames import MAX_NAME_BYTES, MAX_NAME_CHARS, safe_filename


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


# Issue 23, item 3: names are capped in UTF-8 bytes, not characters, so that the storage key's last
# component (`<uuid-hex>_<name>`, 33 bytes more) stays under the file systems' 255-byte limit.
@pytest.mark.parametrize(("raw", "char_bytes"), [("图" * 90 + ".jpg", 3), ("\U0001d400" * 70 + ".jpg", 4)])
def test_names_are_capped_in_utf8_bytes_on_a_character_boundary(raw: str, char_bytes: int) -> None:
    name = safe_filename(raw, "image/jpeg")
    encoded = name.encode("utf-8")
    assert len(encoded) <= MAX_NAME_BYTES
    assert name.endswith(".jpg")  # the extension is kept
    assert (len(encoded) - 4) % char_bytes == 0  # cut between characters, never inside one
    assert len(f"{'0' * 32}_{name}".encode()) + len(".tmp") <= 255
    assert safe_filename(name, "image/jpeg") == name  # already safe: unchanged


def test_a_long_name_without_extension_is_cut_in_bytes_too() -> None:
    name = safe_filename("é" * 300, "image/jpeg")
    assert len(name.encode()) <= MAX_NAME_BYTES and name == "é" * len(name)
