"""The malloc settings `gateway serve` applies (gateway.system.malloc): glibc takes them."""

from __future__ import annotations

import platform

import pytest

from gateway.system import malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_the_settings() -> None:
    assert malloc.tune_for_images() is True
