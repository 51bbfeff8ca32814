"""The TOML writer: whatever it renders, tomllib reads back as the same value."""

from __future__ import annotations

import datetime
import tomllib

from hypothesis import given
from hypothesis import strategies as st

from imdsd.demo_workspace import daemon_config_text
from imdsd.tomlwriter import toml_value

_text = st.text(st.characters(exclude_categories=["Cs"]))
_scalars = st.one_of(
    _text,
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.dates(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=12,
)


@given(_values)
def test_round_trip(value: object) -> None:
    assert tomllib.loads(f"x = {toml_value(value)}")["x"] == value


def test_non_bmp_characters_are_written_as_themselves() -> None:
    text = 'disk \U0001f4be \u00e9\t"quoted" \\ \x7f'
    rendered = toml_value(text)
    assert "\U0001f4be" in rendered
    assert tomllib.loads(f"x = {rendered}")["x"] == text


def test_demo_configuration_with_non_bmp_paths_is_valid_toml() -> None:
    workdir = "/tmp/imdsd-demo-\U0001f600"
    text = daemon_config_text("http://127.0.0.1:1", workdir, ["/bin/echo", "\U0001f4be"])
    parsed = tomllib.loads(text)
    assert parsed["state"]["directory"] == workdir + "/state"
    assert parsed["hook"][0]["command"] == ["/bin/echo", "\U0001f4be"]


def test_dates_render_as_toml_dates() -> None:
    assert toml_value(datetime.date(2024, 2, 29)) == "2024-02-29"
