"""Atomic writes: a result appears under its name complete or not at all."""

import pytest

from ortho_diffusion.files import atomic_file, atomic_folder, atomic_write_json


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("one")
        assert not path.exists()  # nothing under the final name while writing
    assert path.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "one" and leftovers(path.parent) == []
    atomic_write_json(path, {"x": 1})
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"x":1}'


def test_atomic_folder_replaces_a_whole_folder_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "a").write_text("1")
    assert [p.name for p in out.iterdir()] == ["a"]
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("killed")
    assert [p.name for p in out.iterdir()] == ["a"] and leftovers(tmp_path) == []
    with atomic_folder(out) as tmp:
        (tmp / "c").write_text("3")
    assert [p.name for p in out.iterdir()] == ["c"] and leftovers(tmp_path) == []
