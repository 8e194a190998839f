"""The `raymoe` command line (raymoe/cli.py): `inspect` prints K2 Thinking's planning numbers, `make-tiny` writes a
loadable checkpoint, `--help` works from the installed entry point, and bad arguments exit 2 with a message."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from raymoe.cli import main
from raymoe.model.args import PRESETS
from raymoe.model.loader import Checkpoint


def _rows(text: str) -> dict[str, str]:
    """`inspect` output: one `label  value` row per line, label and value split by two or more spaces."""
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in text.strip().splitlines())


def _number(value: str, unit: str) -> float:
    m = re.match(rf"([\d.]+) {unit}\b", value)
    assert m, f"no '<number> {unit}' in {value!r}"
    return float(m.group(1))


def test_inspect_k2_thinking_reports_1t_total_32b_active_and_mla_kv_bytes(capsys):
    assert main(["inspect", "--preset", "kimi-k2-thinking"]) == 0
    out = capsys.readouterr().out
    print(out)
    rows = _rows(out)
    assert rows["layers (dense + MoE)"] == "61 (1 + 60)"
    assert rows["routed experts / top-k"] == "384 / 8"
    assert 1.02 <= _number(rows["total parameters"], "T") <= 1.04  # README: 1T total
    assert 31.5 <= _number(rows["activated parameters"], "B") <= 33.5  # README: 32B activated
    a = PRESETS["kimi-k2-thinking"]
    kv = (a.kv_lora_rank + a.qk_rope_head_dim) * a.num_hidden_layers * 2
    assert kv == 70_272  # (512 + 64) x 61 layers x 2 B (K2_FACTS §2.2)
    assert rows["KV cache per token (MLA, BF16)"].startswith("70,272 B")
    assert "3.56x smaller" in rows["routed experts (INT4 g32)"]


def test_inspect_reads_a_checkpoint_folder(tmp_path, capsys):
    out_dir = tmp_path / "tiny"
    assert main(["make-tiny", str(out_dir), "--seed", "3"]) == 0
    assert "wrote tiny checkpoint" in capsys.readouterr().out
    assert Checkpoint(out_dir).args == PRESETS["tiny"]
    assert main(["inspect", str(out_dir)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["routed experts / top-k"] == "8 / 2"
    assert rows["KV cache per token (MLA, BF16)"].startswith(f"{(32 + 8) * 3 * 2} B")


def test_make_tiny_int4(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "q"), "--quant", "int4"]) == 0
    assert "(INT4 experts)" in capsys.readouterr().out
    assert Checkpoint(tmp_path / "q").args.quantization is not None


def test_help_from_the_installed_entry_point():
    exe = shutil.which("raymoe") or pytest.skip("raymoe console script not installed")
    run = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for command in ("serve", "make-tiny", "inspect", "bench", "status"):
        assert command in run.stdout


def test_help_via_main(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0
    assert "--preset" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    ([], "required: command"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["make-tiny"], "required: out"),
    (["make-tiny", "x", "--preset", "kimi-k2-thinking"], "invalid choice: 'kimi-k2-thinking'"),
    (["make-tiny", "x", "--quant", "fp8"], "invalid choice: 'fp8'"),
    (["make-tiny", "x", "--seed", "abc"], "invalid int value: 'abc'"),
])
def test_bad_arguments_exit_2_with_a_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["inspect"], "exactly one of PATH or --preset"),
    (["inspect", "some/dir", "--preset", "tiny"], "exactly one of PATH or --preset"),
    (["inspect", "--preset", "nope"], "unknown preset 'nope'"),
    (["inspect", "/nonexistent/ckpt"], "no config.json"),
    (["bench", "engine", "--repeats", "0"], "repeats (0) must be >= 1"),
])
def test_bad_values_return_2_with_a_one_line_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("raymoe: error: ") and needle in err and err.count("\n") == 1



def test_inspect_deepseek_v3(capsys):
    assert main(["inspect", "--preset", "deepseek-v3"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["routed experts / top-k"] == "256 / 8"
    assert 670 <= _number(rows["total parameters"], "B") <= 672  # 671B


def test_bench_engine_quick_prints_both_tables(tiny_ckpt, capsys):
    """A smoke run of `raymoe bench engine` (the ratios it prints are recorded, never asserted)."""
    assert main(["bench", "engine", "--quick", "--repeats", "1", "--model", str(tiny_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "best of 1 alternating runs" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+(1|4) \|", line)]
    assert len(rows) == 2 and all(line.count("x") == 2 for line in rows)  # batch 1 and 4: two ratios each
    assert re.search(r"prefix caching off: +[\d.]+ ms", out) and re.search(r"speed-up: [\d.]+x", out)
