"""Where adapters may be loaded from: roots, traversal, symlinks, special files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.adapters.security import AdapterPathError, allowed_roots, check_adapter_path
from app.settings import get_settings


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ok (an adapter folder), outside/secret, and a few traps inside root."""
    (tmp_path / "root" / "ok").mkdir(parents=True)
    (tmp_path / "root" / "ok" / "adapter_config.json").write_text("{}")
    (tmp_path / "root" / "ok" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("no")
    return tmp_path


def refuse(raw: str, roots: list[Path], contains: str) -> str:
    with pytest.raises(AdapterPathError) as info:
        check_adapter_path(raw, roots)
    assert contains in str(info.value), str(info.value)
    return str(info.value)


def test_a_folder_inside_a_root_resolves(tree):
    assert check_adapter_path(str(tree / "root" / "ok"), [tree / "root"]) == (tree / "root" / "ok").resolve()


def test_a_relative_path_is_taken_inside_the_first_root_not_the_working_directory(tree, monkeypatch):
    monkeypatch.chdir(tree / "outside")
    assert check_adapter_path("ok", [tree / "root", tree / "outside"]) == (tree / "root" / "ok").resolve()
    refuse("secret", [tree / "root"], "does not exist")


def test_outside_every_root_names_the_roots(tree):
    message = refuse(str(tree / "outside" / "secret"), [tree / "root", tree / "other"], "outside the folders")
    assert str(tree / "root") in message and str(tree / "other") in message


def test_outside_says_nothing_about_existence(tree):
    """The same answer for a path outside that exists and one that does not: no probing of the disk."""
    there, missing = str(tree / "outside" / "secret"), str(tree / "outside" / "no-such-file")
    assert refuse(there, [tree / "root"], "outside").replace(there, "X") == refuse(
        missing, [tree / "root"], "outside"
    ).replace(missing, "X")


@pytest.mark.parametrize("raw", ["../outside/secret", "ok/../../outside", "ok/..", "{root}/ok/../ok"])
def test_parent_steps_are_refused_even_when_they_stay_inside(tree, raw):
    refuse(raw.format(root=tree / "root"), [tree / "root"], "contains '..'")


def test_missing_path_inside_a_root(tree):
    refuse(str(tree / "root" / "nope"), [tree / "root"], "does not exist")


def test_a_symlink_to_a_folder_outside_is_refused(tree):
    os.symlink(tree / "outside", tree / "root" / "link")
    refuse(str(tree / "root" / "link"), [tree / "root"], "symlink to a place outside")


def test_a_symlinked_file_inside_the_adapter_folder_leading_outside_is_refused(tree):
    os.symlink(tree / "outside" / "secret", tree / "root" / "ok" / "adapter_model.safetensors.2")
    refuse(str(tree / "root" / "ok"), [tree / "root"], "adapter_model.safetensors.2 in lora_path")


def test_symlinks_that_stay_inside_the_roots_are_fine(tree):
    os.symlink(tree / "root" / "ok", tree / "root" / "alias")
    os.symlink(tree / "root" / "ok" / "adapter_config.json", tree / "root" / "ok" / "copy.json")
    assert check_adapter_path(str(tree / "root" / "alias"), [tree / "root"]) == (tree / "root" / "ok").resolve()


def test_a_root_that_is_itself_a_symlink_works(tree):
    os.symlink(tree / "root", tree / "root-link")
    assert check_adapter_path(str(tree / "root-link" / "ok"), [tree / "root-link"]) == (tree / "root" / "ok").resolve()


def test_broken_and_looping_symlinks_are_refused(tree):
    os.symlink(tree / "root" / "gone", tree / "root" / "ok" / "dangling")
    refuse(str(tree / "root" / "ok"), [tree / "root"], "broken symlink")
    os.symlink(tree / "root" / "loop", tree / "root" / "loop")
    refuse(str(tree / "root" / "loop"), [tree / "root"], "lora_path")


def test_special_files_are_refused(tree):
    os.mkfifo(tree / "root" / "ok" / "pipe")
    refuse(str(tree / "root" / "ok"), [tree / "root"], "not a regular file")
    refuse(str(tree / "root" / "ok" / "pipe"), [tree / "root"], "neither a folder nor a regular file")


@pytest.mark.parametrize(("raw", "contains"), [("", "empty"), ("a\x00b", "NUL"), ("x" * 5000, "longer than")])
def test_malformed_paths(tree, raw, contains):
    refuse(raw, [tree / "root"], contains)


def test_allowed_roots_start_with_the_store_adapter_folder(tree, monkeypatch):
    monkeypatch.setenv("MXEXT_HOME", str(tree / "home"))
    get_settings.cache_clear()
    try:
        assert allowed_roots([tree / "root", "rel"]) == (
            tree / "home" / "adapters", tree / "root", Path.cwd() / "rel",
        )  # fmt: skip
    finally:
        get_settings.cache_clear()
