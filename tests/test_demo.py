"""scripts/demo.sh says which allocator the demo runs on (tcmalloc, else jemalloc, else glibc
with the install command), without running the demo: `demo.sh --allocator` runs only that
choice, over library directories the test makes. And the demo report names the allocators."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wasi_tool.pipeline.report import _allocator_line

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.sh"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("bash") is None, reason="bash on Linux"
)


def _choice(libdir: Path, *libs: str, ld_preload: str | None = None) -> list[str]:
    libdir.mkdir(exist_ok=True)
    for lib in libs:
        (libdir / lib).write_bytes(b"")  # a stand-in: --allocator only looks for the file
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    env.pop("WASI_TOOL_ALLOCATOR_PATH", None)
    env["DEMO_ALLOCATOR_DIRS"] = str(libdir)  # instead of the system's directories
    if ld_preload is not None:
        env["LD_PRELOAD"] = ld_preload
    done = subprocess.run(
        ["bash", str(DEMO), "--allocator"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr  # never an error, whatever is installed
    return done.stdout.splitlines()


def test_without_jemalloc_or_tcmalloc_one_line_names_glibc_and_the_install(tmp_path: Path) -> None:
    lines = _choice(tmp_path / "lib")
    assert len(lines) == 1, lines
    assert "allocator: glibc" in lines[0]
    assert "apt-get install libtcmalloc-minimal4" in lines[0]
    assert "error" not in lines[0].lower()


def test_tcmalloc_is_preferred_then_jemalloc(tmp_path: Path) -> None:
    both = _choice(tmp_path / "both", "libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    assert both == [
        f"== allocator: tcmalloc ({tmp_path / 'both' / 'libtcmalloc_minimal.so.4'}, preloaded)"
    ]
    je = _choice(tmp_path / "je", "libjemalloc.so.2")
    assert je == [
        f"== allocator: jemalloc ({tmp_path / 'je' / 'libjemalloc.so.2'}, preloaded; "
        "MALLOC_CONF=dirty_decay_ms:1000,muzzy_decay_ms:0)"
    ]


def test_an_allocator_the_user_preloaded_is_kept_and_named(tmp_path: Path) -> None:
    # a name only: the stand-in path does not exist, so the loader just warns on stderr
    lines = _choice(
        tmp_path / "lib", "libtcmalloc_minimal.so.4", ld_preload="/nowhere/libjemalloc.so.2"
    )
    assert lines == ["== allocator: jemalloc (already in LD_PRELOAD)"]


def test_the_demo_chooses_the_allocator_before_it_runs() -> None:
    body = DEMO.read_text().split('if [ "${1:-}" = "--allocator" ]', 1)[1]
    assert body.index("choose_allocator") < body.index("wasi-tool run pipelines/demo.toml")


def test_the_report_names_the_allocators_and_how_to_get_tcmalloc() -> None:
    assert _allocator_line(["jemalloc", "jemalloc"]) == [
        "Allocator: every row ran on jemalloc.",
        "",
    ]
    mixed = _allocator_line(
        ["glibc, 64 KiB mmap threshold", "system", "glibc, 64 KiB mmap threshold"]
    )[0]
    assert mixed.startswith("Allocators: glibc, 64 KiB mmap threshold (2 rows), system (1 row).")
    assert "apt-get install libtcmalloc-minimal4" in mixed
    assert _allocator_line([None])[0].startswith("Allocator: every row ran on unknown.")
    assert _allocator_line([]) == []
