"""The Smalltalk generator (bridge/smalltalk.py), in Python only: no VM, no server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.smalltalk import (
    CHECKED_IN,
    COMPONENT_ORDER,
    DEFAULT_MODEL_ID,
    DEFAULT_N_LAYERS,
    TEMPLATE,
    generate_neuroscope_smalltalk_interface,
)

ROOT = Path(__file__).resolve().parent.parent


class FakeClient:
    """What the generator needs from LMStudioNeuroScopeClient: base_url and hook_points()."""

    def __init__(self, base_url, points):
        self.base_url = base_url
        self._points = points

    def hook_points(self):
        return self._points


def test_checked_in_source_is_the_generator_output():
    """smalltalk/LMStudioRESTClient.st == the generator for the default address and model.
    If this fails: `python -m bridge.smalltalk` and commit the result."""
    assert CHECKED_IN.read_text(encoding="utf-8") == generate_neuroscope_smalltalk_interface()


def test_module_command_writes_the_same_source():
    out = subprocess.run([sys.executable, "-m", "bridge.smalltalk", "-o", "-"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out == CHECKED_IN.read_text(encoding="utf-8")


def test_default_facts_match_the_default_model():
    from engine.default_model import MODEL_ID

    assert DEFAULT_MODEL_ID == MODEL_ID
    src = generate_neuroscope_smalltalk_interface()
    assert "defaultBaseUrl\n\t\"the server address this source was generated for\"\n\t^ 'http://127.0.0.1:8080'!" in src
    assert f"^ '{MODEL_ID}'!" in src and f"^ {DEFAULT_N_LAYERS}!" in src
    assert "^ #(" + " ".join(f"'{c}'" for c in COMPONENT_ORDER) + ")!" in src


def test_facts_from_a_client():
    points = {"model_id": "tiny-llama", "n_layers": 3, "points": [
        {"name": "hook_embed", "component": "embedding"},
        {"name": "blocks.0.attn.hook_pattern", "component": "attention_pattern"},
        {"name": "blocks.0.hook_resid_post", "component": "residual"},
        {"name": "blocks.0.hook_resid_pre", "component": "residual"},
    ]}
    src = generate_neuroscope_smalltalk_interface(FakeClient("http://127.0.0.1:9999/", points))
    assert "^ 'http://127.0.0.1:9999'!" in src
    assert "^ 'tiny-llama'!" in src and "^ 3!" in src
    assert "^ #('residual' 'embedding' 'attention_pattern')!" in src  # the contract's order
    assert "server http://127.0.0.1:9999 and the model tiny-llama (3 layers)" in src
    # keywords override what the client says
    src = generate_neuroscope_smalltalk_interface(FakeClient("http://127.0.0.1:9999", points), n_layers=7)
    assert "^ 7!" in src and "^ 'tiny-llama'!" in src


def test_keyword_facts_and_escaping():
    src = generate_neuroscope_smalltalk_interface(base_url="http://localhost:1234", model_id='o\'k"!', n_layers=2,
                                                  components=["zeta", "mlp"])
    assert "^ 'o''k\"!!'!" in src  # quote doubled in the string, ! doubled for the chunk format
    assert "model o'k\"\"!! (2 layers)" in src  # in the header comment: \" doubled, ! doubled
    assert "^ #('mlp' 'zeta')!" in src
    assert not re.search(r"@@[A-Z_]+@@", src)


@pytest.mark.parametrize("bad", ["https://127.0.0.1:8080", "127.0.0.1:8080", "http://", "http://a b:80"])
def test_rejects_addresses_the_client_cannot_use(bad):
    with pytest.raises(ValueError):
        generate_neuroscope_smalltalk_interface(base_url=bad)


def test_template_is_package_data_and_fully_substituted():
    assert TEMPLATE.parent.name == "templates" and TEMPLATE.suffix == ".st"  # pyproject: templates/*.st
    markers = set(re.findall(r"@@([A-Z_]+)@@", TEMPLATE.read_text(encoding="utf-8")))
    assert markers == {"GENERATED_NOTE", "BASE_URL", "MODEL_ID", "N_LAYERS", "COMPONENTS",  # the server and model
                       "ALL_COMPONENTS", "ATTENTION_INTERNALS", "PER_HEAD", "KEY_PADDED",  # vocabulary.py
                       "NEGATIVE_INFINITY_PADDED"}
    assert not re.search(r"@@[A-Z_]+@@", CHECKED_IN.read_text(encoding="utf-8"))


def test_source_keeps_to_the_portable_dialect():
    """Constructs the 2003 image (and SqueakJS's usual images) lack, or that break chunk format."""
    src = CHECKED_IN.read_text(encoding="utf-8")
    code = re.sub(r'"(?:[^"]|"")*"', '""', src)  # drop comments
    code = re.sub(r"'(?:[^']|'')*'", "''", code)  # drop string literals
    for banned in ("on: Error", "on:do:", "ensure:", "ifCurtailed:", "isString", "join:", "format:", "<<",
                   "streamContents:", "#[", "includesSubstring:", "startsWith:", "allSatisfy:", "notEmpty",
                   "ifNotNil:", "ifEmpty:"):
        assert banned not in code, banned
    assert not re.search(r"#[A-Za-z]+_", code), "underscores in literal symbols are assignments in old images"
    assert not re.search(r"\b[a-z][A-Za-z0-9]*_[A-Za-z]", code), "underscores in identifiers"
