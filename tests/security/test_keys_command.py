"""``diptych keys generate`` / ``list``."""

from __future__ import annotations

from diptych.cli import main
from diptych.services.common.security import KeySet


def test_generate_then_list(tmp_path, capsys):
    directory = str(tmp_path / "keys")
    assert main(["keys", "generate", directory]) == 0
    assert KeySet.load(directory).names() == ["coordinator", "decode-0", "frontend", "prefill-0"]
    assert main(["keys", "generate", directory, "flex-0", "--workers", "2"]) == 0
    keys = KeySet.load(directory)
    assert set(keys.names()) == {"coordinator", "frontend", "flex-0", "prefill-0", "prefill-1", "decode-0",
                                 "decode-1"}
    capsys.readouterr()
    assert main(["keys", "list", directory]) == 0
    out = capsys.readouterr().out
    assert keys.public_key("flex-0").decode() in out and "secret" not in out


def test_bad_name_writes_nothing(tmp_path, capsys):
    directory = tmp_path / "keys"
    assert main(["keys", "generate", str(directory), "ok", "not ok"]) == 1
    assert "invalid key name" in capsys.readouterr().err
    assert not directory.exists()
