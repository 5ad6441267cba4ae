"""write_model_dir: a deployment's model files, replaced whole, with nothing left beside them."""

from __future__ import annotations

from pathlib import Path

from ember.cluster.model_files import write_model_dir


def test_model_files_replace_the_old_ones_and_clear_what_a_killed_writer_left(tmp_path: Path) -> None:
    root = tmp_path / "models"
    orphan = root / ".tiny.tmp-0123456789ab"  # a controller killed while writing them
    orphan.mkdir(parents=True)
    (orphan / "config.json").write_text("{}")
    orphan.with_name(f"{orphan.name}.lock").touch()

    write_model_dir(root, "tiny", {"config.json": b"old", "tokenizer.json": b"{}"})
    dest = write_model_dir(root, "tiny", {"config.json": b"new", "sub/chat_template.jinja": b"t"})
    assert dest == root / "tiny"
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "config.json",
        "sub/chat_template.jinja",
    ]
    assert (dest / "config.json").read_bytes() == b"new"
    assert sorted(p.name for p in root.iterdir()) == ["tiny"]
