"""Content digests name their algorithm: bare hex is the legacy sha256 scheme, ``blake3:`` the current one."""

from __future__ import annotations

import pytest

from patchlab.digests import (
    BLAKE3,
    CONTENT_ALGORITHM,
    LEGACY,
    content_algorithm,
    hex_part,
    make_digest,
    same_algorithm,
    short_digest,
)
from patchlab.errors import UnknownDigestError

HEX = "0123456789abcdef" * 4


def test_algorithms_are_told_apart_by_the_recorded_string():
    assert CONTENT_ALGORITHM == BLAKE3
    assert content_algorithm(HEX) == LEGACY and make_digest(LEGACY, HEX) == HEX
    assert content_algorithm(make_digest(BLAKE3, HEX)) == BLAKE3 == content_algorithm("blake3:" + HEX)
    assert same_algorithm(HEX, "f" * 64) and not same_algorithm(HEX, "blake3:" + HEX)
    assert hex_part("blake3:" + HEX) == HEX == hex_part(HEX)
    assert short_digest("blake3:" + HEX) == HEX[:12] == short_digest(HEX) and short_digest(None) == "?"


@pytest.mark.parametrize("bad", ["", "abc", HEX.upper(), HEX + "0", "blake3:" + HEX[:-1], "sha512:" + HEX, "blake3:"])
def test_unknown_formats_are_refused_with_advice(bad):
    with pytest.raises(UnknownDigestError, match="upgrade patchlab"):
        content_algorithm(bad)
    assert not same_algorithm(bad, bad)
