"""``flowdppo pretrain --world <name>`` for every built-in world (the digits build itself is
tested with a quick recipe in test_digits_world.py)."""

from __future__ import annotations

from flowdppo.cli import main
from flowdppo.worlds import BUILTIN_BASES, WORLDS
from flowdppo.worlds.shapes import ASSET_DIR


def test_pretrain_shapes_succeeds_and_names_the_shipped_base(tmp_path, capsys):
    assert main(["pretrain", "--world", "shapes", "--cache-dir", str(tmp_path)]) == 0
    assert f"shapes base model: {ASSET_DIR}" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # shipped weights: nothing cached


def test_pretrain_shapes_force_explains_how_to_rebuild(capsys):
    assert main(["pretrain", "--world", "shapes", "--force"]) == 2
    assert "scripts/make_shapes_base.py" in capsys.readouterr().err


def test_every_built_in_world_takes_what_pretrain_passes():
    import inspect

    assert sorted(BUILTIN_BASES) == [n for n in WORLDS.names() if n in BUILTIN_BASES]
    for name in BUILTIN_BASES:
        parameters = inspect.signature(WORLDS.lookup(name)).parameters
        assert {"cache_dir", "force"} <= set(parameters), name


def test_pretrain_unknown_world_hints_the_nearest(capsys):
    assert main(["pretrain", "--world", "digit"]) == 2
    assert "unknown world 'digit'" in capsys.readouterr().err
