import os

import pytest
import torch

# two cores: keep intra-op threads bounded and results reproducible
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# shrunk sizes so every registered architecture runs in milliseconds
TINY = dict(
    img_size=32,
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
)


def tiny_overrides(name: str) -> dict:
    """Overrides that shrink a registered model while keeping its family and patch size."""

    kw = dict(TINY)
    if "patch14" in name:
        kw["img_size"] = 28
    if "patch4" in name:
        kw["img_size"] = 16
    return kw


def snapshot(*roots) -> dict:
    """{path: bytes} of every file under ``roots`` (files or folders; missing ones are skipped)."""
    from pathlib import Path

    out = {}
    for root in map(Path, roots):
        if root.is_file():
            out[str(root)] = root.read_bytes()
        elif root.is_dir():
            out.update({str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
    return out


@pytest.fixture
def cli_fails(capsys):
    """Run ``openmae ARGV`` in-process and assert a clean user error: exit 2, one ``openmae CMD:
    error:`` line on stderr naming every string of ``expect`` (case-insensitive), no traceback, and
    every file under ``keep`` (paths) byte-identical after. Returns the error message."""

    def run(argv: list[str], expect: list[str], keep=()) -> str:
        from openmae.cli import main

        before = snapshot(*keep)
        os.environ.pop("OPENMAE_DEBUG", None)
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2, f"exit {code} for {argv}; stderr:\n{err}"
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith(f"openmae {argv[0]}: error:")]
        assert lines, f"no 'openmae {argv[0]}: error:' line in stderr:\n{err}"
        message = lines[-1]
        for text in expect:
            assert text.lower() in message.lower(), f"{text!r} not in {message!r}"
        assert snapshot(*keep) == before, f"{argv} changed files it must leave alone"
        return message

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny end-to-end runs: on a shared, loaded CPU it is several
    times faster than two threads fighting for cores (and every run of a comparison uses the same count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
