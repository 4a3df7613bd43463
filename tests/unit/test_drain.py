"""The drain job's pure parts: local file names that are safe whatever the server sends, URLs, rates."""

from __future__ import annotations

import argparse

import pytest

from gateway.syncjob.cli import parse_rate
from gateway.syncjob.drain import DrainError, local_name, sync_base_url


def test_local_names_stay_inside_the_batch_folder() -> None:
    assert local_name("img_1", "frame.jpg") == "img_1_frame.jpg"
    assert local_name("img_1", "../../etc/passwd") == "img_1__.._etc_passwd"
    assert local_name("img_1", "a\\b\x00c\n.png") == "img_1_a_b_c_.png"
    assert local_name("img_1", "...") == "img_1_image"
    assert len(local_name("img_1", "x" * 1000)) == len("img_1_") + 150
    for bad in ("../img", "/abs", "", ".hidden", "a/b"):
        with pytest.raises(DrainError):
            local_name(bad, "f.jpg")


def test_sync_base_url_accepts_the_forms_people_type() -> None:
    for url in ("http://gw:8080", "http://gw:8080/", "http://gw:8080/api", "http://gw:8080/api/sync/"):
        assert sync_base_url(url) == "http://gw:8080/api/sync"


def test_rates() -> None:
    assert parse_rate("0") == 0
    assert parse_rate("500K") == 500 * 1024
    assert parse_rate("2M") == 2 * 1024 * 1024
    assert parse_rate("1.5MiB") == int(1.5 * 1024 * 1024)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rate("fast")


def test_local_names_are_capped_in_utf8_bytes() -> None:
    """Issue 23, item 3: 90 CJK characters (270 bytes) made `<image_id>_<name>.part` longer than
    the 255 bytes a file name may have, and the batch failed on every run."""
    image_id = "img_" + "0" * 8 + "-0000-0000-0000-" + "0" * 12
    for raw in ("图" * 90 + ".jpg", "\U0001d400" * 70 + ".jpg", "x" * 400):
        name = local_name(image_id, raw)
        assert len((name + ".part").encode()) <= 255, raw
        assert name.startswith(image_id + "_")
        assert name.encode().decode() == name
    assert local_name(image_id, "图" * 90 + ".jpg").endswith(".jpg")
