"""Every trainer-, decoder-, cache-, config- and data-side fault class of docs/faults.md, caused for real.

Each case runs the real entry point (``cnn3d.cli.train_main`` / ``decode_main`` / ``cache_main``, the functions
behind the console scripts) in this process with ``sys.argv`` set, and checks the exit code and that stderr is
exactly one ``error: ...`` line naming the problem, with no traceback. Two cases also run the installed
console scripts as subprocesses. Every case id must have its row in docs/faults.md carrying the same message
fragment, and every row of the trainer-side sections must have a case here (or name the test that covers it).
"""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cnn3d import preset, with_overrides
from cnn3d.checkpoint import CHECKSUMS, save_checkpoint
from cnn3d.cli import cache_main, decode_main, train_main
from cnn3d.model import build_model

ROOT = Path(__file__).resolve().parents[1]
FAULTS_MD = ROOT / "docs" / "faults.md"
BIN = Path(sys.executable).parent
TEACHER_DIM = 24
CKPT_SETS = {"lattice.size": 3, "lattice.steps": 1, "lattice.state_size": 2, "transform.positional_encoding": False}
QUIET = ["--log-level", "warning", "--no-progress", "--set", "train.main_epochs=1"]


# --------------------------------------------------------------------------- assets


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@functools.cache
def _tiny_model():
    config = with_overrides(preset("test"), CKPT_SETS)
    return config, build_model(config, TEACHER_DIM)


def _checkpoint(folder: Path, spoil=None, legacy: bool = False, epochs_done: int = 1) -> str:
    config, model = _tiny_model()
    save_checkpoint(folder, model, config, {"teacher_dim": TEACHER_DIM, "epochs_done": epochs_done, "step": 3})
    if legacy:
        (folder / CHECKSUMS).unlink()
    if spoil:
        spoil(folder)
    return str(folder)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Bad inputs on disk, built once: corpus files, configs, checkpoints whole and damaged."""
    root = tmp_path_factory.mktemp("faults")
    a = {"root": root}

    def write(name, data):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
        a[name] = str(path)

    write("empty.txt", "")
    write("binary.txt", b"abc\x00def\n" * 10)
    write("latin1.txt", "caf\xe9 au lait is served here\n".encode("latin-1"))
    write("bad.jsonl", '{"text": "a fine first line here"}\n{oops\n')
    write("nocol.csv", "body,label\nsome words here,1\n")
    write("doc.pdf", "%PDF-1.4\n")
    write("few.txt", "one two three four\nfive six seven eight\nnine ten eleven twelve\n")
    (root / "nofiles").mkdir()
    write("nofiles/readme.md", "not a corpus file")
    write("bad.json", "{not json")
    write("nan.json", '{"loss": {"reconstruction": NaN}}')
    write("list.json", "[1, 2]")
    write("bad.yaml", "lattice: [unclosed\n")
    write("a_file", "I am a file")
    write("mine/notes.txt", "the user's own notes")
    a["nofiles"], a["mine"] = str(root / "nofiles"), str(root / "mine")
    cks = root / "ck"
    a["ck"] = _checkpoint(cks / "good")
    a["ck_done"] = _checkpoint(cks / "done", epochs_done=3)
    a["ck_truncated"] = _checkpoint(cks / "trunc", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:64]))
    a["ck_empty"] = _checkpoint(cks / "empty", lambda f: (f / "model.safetensors").write_bytes(b""))
    a["ck_garbage"] = _checkpoint(cks / "garbage", lambda f: (f / "model.safetensors").write_bytes(os.urandom(512)))
    a["ck_flipped"] = _checkpoint(cks / "flipped", lambda f: _flip(f / "model.safetensors"))
    a["ck_badmeta"] = _checkpoint(cks / "badmeta", lambda f: (f / "meta.json").write_text("{truncated"))
    a["ck_resized"] = _checkpoint(cks / "resized", lambda f: (f / "config.json").write_text(
        (f / "config.json").read_text().replace('"size": 3', '"size": 5')))
    a["ck_legacy_resized"] = _checkpoint(cks / "legacy_resized", lambda f: (f / "config.json").write_text(
        (f / "config.json").read_text().replace('"size": 3', '"size": 5')), legacy=True)
    a["ck_legacy_garbage"] = _checkpoint(
        cks / "legacy_garbage", lambda f: (f / "model.safetensors").write_bytes(os.urandom(512)), legacy=True)
    a["ck_legacy_badmeta"] = _checkpoint(cks / "legacy_badmeta", lambda f: (f / "meta.json").write_text("[]"),
                                         legacy=True)
    a["ck_nometa"] = _checkpoint(cks / "nometa", lambda f: (f / "meta.json").unlink())
    a["ck_checksums"] = _checkpoint(cks / "checksums", lambda f: (f / CHECKSUMS).write_text("{}"))
    a["ck_config"] = str(cks / "good" / "config.json")
    a["missing"] = str(root / "no" / "such")
    return a


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    """A folder nobody can write into, root included (``chattr +i``; chmod alone does not bind root)."""
    folder = tmp_path_factory.mktemp("ro")
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        (folder / "probe").mkdir()
        (folder / "probe").rmdir()
        writable = True
    except OSError:
        writable = False
    yield None if writable else str(folder)
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


# --------------------------------------------------------------------------- the cases

# id: (command, argv with {asset} placeholders, expected stderr fragment, exit code)
CASES = {
    # config
    "C01": ("train", ["--set", "lattice.sise=4"], "did you mean lattice.size", 2),
    "C02": ("train", ["--set", "transform.dropout=2"], "transform.dropout=2.0 is out of range [0.0, 0.5]", 2),
    "C03": ("train", ["--set", "train.lr=nan"], "train.lr=nan is not a finite number", 2),
    "C04": ("train", ["--set", "loss.reconstruction=nan"], "loss.reconstruction=nan is not a finite number", 2),
    "C05": ("train", ["--set", "moe.gate_temperature=nan"], "moe.gate_temperature=nan is not a finite number", 2),
    "C06": ("train", ["--set", "train.weight_decay=inf"], "train.weight_decay=inf is not a finite number", 2),
    "C07": ("train", ["--set", "lattice.size=abc"], "lattice.size='abc' is not an integer", 2),
    "C08": ("train", ["--set", "lattice.boundary=mirror"], "lattice.boundary='mirror' is not one of zero, periodic", 2),
    "C09": ("train", ["--set", "lattice.size"], "--set expects key=value", 2),
    "C10": ("train", ["--set", "moe.experts=local", "--set", "moe.gating=topk"], "moe.top_k=2 exceeds the 1 experts", 2),
    "C11": ("train", ["--set", "lattice.size=2", "--set", "lattice.boundary=periodic", "--set", "moe.functional_radius=3"],
            "moe.functional_radius=3 exceeds the smallest lattice side 2", 2),
    "C12": ("train", ["--set", "train.curriculum_start_difficulty=0.9", "--set", "train.curriculum_end_difficulty=0.5"],
            "train.curriculum_end_difficulty must be >= train.curriculum_start_difficulty", 2),
    "C13": ("train", ["--set", "data.min_words=10", "--set", "data.max_words=5"], "data.max_words=5 must be >= data.min_words=10", 2),
    "C14": ("train", ["--set", "train.main_epochs=0"], "must be at least 1", 2),
    "C15": ("train", ["--config", "{missing}"], "does not exist", 2),
    "C16": ("train", ["--config", "{bad.json}"], "is not valid json: Expecting property name", 2),
    "C17": ("train", ["--config", "{nan.json}"], "loss.reconstruction=nan is not a finite number", 2),
    "C18": ("train", ["--config", "{list.json}"], "a config must be a mapping of sections, got list", 2),
    "C19": ("train", ["--config", "{bad.yaml}"], "is not valid yaml", 2),
    "C20": ("train", ["--preset", "huge"], "'huge' is not one of", 2),
    "C21": ("train", ["--bogus"], "No such option '--bogus'", 2),
    "C22": ("train", ["--log-level", "loud"], "'loud' is not one of", 2),
    # data
    "D01": ("train", ["--corpus", "{missing}"], "does not exist; use 'builtin'", 2),
    "D02": ("train", ["--corpus", "{empty.txt}"], "is empty", 2),
    "D03": ("train", ["--corpus", "{binary.txt}"], "looks binary", 2),
    "D04": ("train", ["--corpus", "{latin1.txt}"], "is not UTF-8 text", 2),
    "D05": ("train", ["--corpus", "{bad.jsonl}"], "line 2 is not valid JSON", 2),
    "D06": ("train", ["--corpus", "{nocol.csv}"], "has no column 'text' (columns: 'body', 'label')", 2),
    "D07": ("train", ["--corpus", "{doc.pdf}"], "unsupported extension '.pdf'", 2),
    "D08": ("train", ["--corpus", "{few.txt}"], "has 3 usable sentences after cleaning", 2),
    "D09": ("train", ["--corpus", "{nofiles}"], "has no usable files", 2),
    "D10": ("train", ["--set", "data.decode_bank={missing}"], "does not exist; give a text file with one phrase per line", 2),
    "D11": ("train", ["--set", "teacher.model={missing}"], "/no/such", 2),
    # outputs (checked before any training time is spent)
    "O01": ("train", ["--out", "{read_only}/ck"], "cannot write checkpoints beside", 2),
    "O02": ("train", ["--out", "{a_file}"], "is a file", 2),
    "O03": ("train", ["--out", "{mine}"], "already holds files and is not a cnn3d checkpoint", 2),
    "O04": ("train", ["--metrics-json", "{read_only}/m.json"], "cannot write --metrics-json", 2),
    "O05": ("train", ["--metrics-json", "{mine}"], "is a directory", 2),
    # resume
    "R01": ("train", ["--resume", "{missing}"], "does not exist; pass a folder written by cnn3d-train --out", 2),
    "R02": ("train", ["--resume", "{mine}"], "is not a cnn3d checkpoint (missing model.safetensors, config.json, meta.json)", 2),
    "R03": ("train", ["--resume", "{ck}"], "the model config differs in lattice.size (3 in the checkpoint, 8 now)", 2),
    "R04": ("train", ["--resume", "{ck_truncated}"], "model.safetensors does not match the checksum", 2),
    "R05": ("train", ["--resume", "{ck_flipped}"], "model.safetensors does not match the checksum", 2),
    "R06": ("train", ["--resume", "{ck_badmeta}"], "meta.json does not match the checksum", 2),
    "R07": ("train", ["--resume", "{ck_resized}"], "config.json does not match the checksum", 2),
    "R08": ("train", ["--resume", "{ck_done}", "--config", "{ck_config}", "--set", "train.main_epochs=3"], "has already done 3 of 3 epochs", 2),
    "R09": ("train", ["--resume", "{ck_legacy_badmeta}"], "meta.json must be a JSON object", 2),
    # decode
    "X01": ("decode", ["--checkpoint", "{mine}", "hello there"], "is not a cnn3d checkpoint", 2),
    "X02": ("decode", ["--checkpoint", "{ck_empty}", "hello there"], "model.safetensors does not match the checksum", 2),
    "X03": ("decode", ["--checkpoint", "{ck_garbage}", "hello there"], "model.safetensors does not match the checksum", 2),
    "X04": ("decode", ["--checkpoint", "{ck_flipped}", "hello there"], "model.safetensors does not match the checksum", 2),
    "X05": ("decode", ["--checkpoint", "{ck_nometa}", "hello there"], "missing meta.json", 2),
    "X06": ("decode", ["--checkpoint", "{ck_checksums}", "hello there"], "checksums.json is damaged", 2),
    "X07": ("decode", ["--checkpoint", "{ck_legacy_resized}", "hello there"],
            "the weights do not fit the model its config describes (size mismatch", 2),
    "X08": ("decode", ["--checkpoint", "{ck_legacy_garbage}", "hello there"], "is not a readable safetensors file", 2),
    "X09": ("decode", ["--checkpoint", "{ck}", "--bank", "{missing}", "hello there"], "does not exist; give a text file", 2),
    "X10": ("decode", ["--checkpoint", "{ck}"], "Missing argument 'TEXTS...'", 2),
    "X11": ("decode", ["--checkpoint", "{missing}", "hello there"], "does not exist; pass a folder written by", 2),
    "X12": ("decode", ["--checkpoint", "{ck}", "--top", "0", "hello there"], "0 is not in the range 1<=x<=20", 2),
    # cache
    "K01": ("cache", ["bogus"], "No such command 'bogus'", 2),
    "K02": ("cache", ["stats", "--cache-dir", "{a_file}"], "is a file", 2),
    "K03": ("cache", ["warm", "--corpus", "{missing}"], "does not exist; use 'builtin'", 2),
    "K04": ("cache", ["stats", "--set", "data.max_cache_size_gb=nan"], "data.max_cache_size_gb=nan is not a finite number", 2),
}

MAINS = {"train": ("cnn3d-train", train_main), "decode": ("cnn3d-decode", decode_main),
         "cache": ("cnn3d-cache", cache_main)}


def _argv(case_args, assets, read_only):
    values = {**assets, "read_only": read_only}
    return [re.sub(r"\{([^}]+)\}", lambda m: str(values[m.group(1)]), arg) for arg in case_args]


def _run_in_process(command, argv, capsys, monkeypatch):
    name, main = MAINS[command]
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def _assert_one_line(err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], err


@pytest.mark.parametrize("case", list(CASES))
def test_fault_gives_one_line_and_exit_code(case, assets, read_only, capsys, monkeypatch):
    command, args, fragment, code = CASES[case]
    if read_only is None and any("{read_only}" in a for a in args):
        pytest.skip("cannot make a read-only folder here")
    extra = QUIET if command == "train" and "--log-level" not in args else []
    got, err = _run_in_process(command, [*extra, *_argv(args, assets, read_only)], capsys, monkeypatch)
    assert got == code, err
    _assert_one_line(err, fragment)


def test_unwritable_out_fails_before_anything_else_runs(assets, read_only, capsys, monkeypatch):
    """At --log-level info the error is the only line: no corpus read, teacher load or epoch happened."""
    if read_only is None:
        pytest.skip("cannot make a read-only folder here")
    got, err = _run_in_process("train", ["--out", f"{read_only}/ck", "--log-level", "info", "--no-progress"],
                               capsys, monkeypatch)
    assert got == 2
    _assert_one_line(err, "cannot write checkpoints beside")


def test_interrupt_exits_130_in_every_command_style(capsys):
    """Ctrl-C (click's Abort) ends a single command and a command group the same way."""
    import click

    from cnn3d.cli import CliGroup, standalone

    @click.command()
    def single():
        raise KeyboardInterrupt

    @click.group(cls=CliGroup)
    def group():
        pass

    @group.command()
    def sub():
        raise KeyboardInterrupt

    codes = []
    for call in (lambda: standalone(single), lambda: group.main(["sub"])):
        with pytest.raises(SystemExit) as exit_info:
            old = sys.argv
            sys.argv = ["x"]
            try:
                call()
            finally:
                sys.argv = old
        codes.append(exit_info.value.code)
        _assert_one_line(capsys.readouterr().err, "interrupted")
    assert codes == [130, 130]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["C03", "X04"])
def test_fault_through_the_installed_console_script(case, assets, read_only):
    command, args, fragment, code = CASES[case]
    extra = QUIET if command == "train" else []
    proc = subprocess.run([str(BIN / MAINS[command][0]), *extra, *_argv(args, assets, read_only)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == code, proc.stderr
    _assert_one_line(proc.stderr, fragment)


# --------------------------------------------------------------------------- the table stays true


def _table_rows() -> dict[str, str]:
    """Rows of the cnn3d sections (the tuner's section at the end is kept true by the tuner's tests)."""
    rows = {}
    for line in FAULTS_MD.read_text().split("\n## Tuner", 1)[0].splitlines():
        match = re.match(r"\|\s*([A-Z]\d\d)\s*\|", line)
        if match:
            rows[match.group(1)] = line
    return rows


# Rows proven by other tests (a fault that needs a process killed or a disk filled, or a Python API).
ELSEWHERE = {
    "S01": "tests/test_checkpoint.py::test_sigkill_at_random_points_of_saving_never_leaves_a_mixed_checkpoint",
    "S02": "tests/test_checkpoint.py::test_full_disk_during_a_save_keeps_the_previous_checkpoint",
    "S03": "tests/test_checkpoint.py::test_a_writer_killed_between_its_renames_leaves_the_previous_checkpoint",
    "S04": "tests/test_train.py::test_non_finite_loss_stops_with_a_reason",
    "S05": "tests/test_faults.py::test_interrupt_exits_130_in_every_command_style",
    "S06": "tests/test_cache.py::test_corrupt_shard_is_discarded_and_recomputed",
}


def test_docs_faults_table_matches_the_cases():
    rows = _table_rows()
    ours = {k for k in rows if k[0] in "CDORXKS"}
    assert ours == set(CASES) | set(ELSEWHERE), sorted(ours ^ (set(CASES) | set(ELSEWHERE)))
    for case, (_, _, fragment, code) in CASES.items():
        assert f"`{fragment}`" in rows[case], (case, fragment)
        assert rows[case].rstrip(" |").endswith(str(code)), rows[case]
    for case, test in ELSEWHERE.items():
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test
        assert name in rows[case], case
    assert len(rows) >= 40
