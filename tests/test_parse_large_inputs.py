"""The front end on inputs a user or an attacker can hand it: megabytes of blank
lines, a 1 MB name, an index of 4,300 digits, a byte order mark, old-Mac or
Windows line ends. Parsing costs memory linear in the input, and an error quotes
at most ~200 characters of a line with its caret still under the fault.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import curvc
from curvc.errors import CurvError

ROOT = Path(__file__).resolve().parent.parent
ADAM = (ROOT / "specs" / "adam.curv").read_text()
SGD_LIKE = ("optimizer X\nhyper lr = 1, b = (0.9, 0.99)\ncurvature empirical_fisher\n"
            "structure diagonal\niterate ema(b[{index}])\nlength gradient_norm\n")


def same_spec(a, b) -> bool:
    """The same IR, whatever the text (the IR keeps its source text)."""
    return dataclasses.replace(a, source="") == dataclasses.replace(b, source="")


def error_of(source: str) -> CurvError:
    with pytest.raises(CurvError) as info:
        curvc.to_ir(source, "big.curv")
    return info.value


# --- indices and numbers with thousands of digits ------------------------------

def test_index_with_4300_leading_zeros_is_index_1():
    # int() refuses strings over 4,300 digits, leading zeros included.
    long = curvc.to_ir(SGD_LIKE.format(index="0" * 4300 + "1"))
    assert long.iterate.beta.index == 1
    assert same_spec(long, curvc.to_ir(SGD_LIKE.format(index="1")))


def test_index_with_ten_thousand_digits_is_a_short_error():
    err = error_of(SGD_LIKE.format(index="9" * 10000))
    assert err.key == "syntax.index_too_large"
    assert len(str(err)) < 1000


def test_number_with_a_million_digits_overflows_with_a_short_message():
    err = error_of(ADAM.replace("eps = 1e-8", "eps = " + "9" * 1_000_000))
    assert err.key == "value.not_finite"
    assert len(str(err)) < 1000
    assert "999...999" in str(err)  # the middle of the number left out, not its ends


# --- byte order mark and line ends -------------------------------------------------

@pytest.mark.parametrize("end", ["\r\n", "\r"], ids=["crlf", "cr_only"])
def test_windows_and_old_mac_line_ends_parse(end):
    assert same_spec(curvc.to_ir(ADAM.replace("\n", end)), curvc.to_ir(ADAM))


def test_mixed_line_ends_parse():
    lines = ADAM.split("\n")
    mixed = "".join(line + ("\n", "\r\n", "\r")[i % 3] for i, line in enumerate(lines))
    assert same_spec(curvc.to_ir(mixed), curvc.to_ir(ADAM))


def test_byte_order_mark_is_accepted():
    assert same_spec(curvc.to_ir("\ufeff" + ADAM), curvc.to_ir(ADAM))


def test_a_file_saved_with_a_bom_and_old_mac_line_ends_loads(tmp_path):
    """What a Windows editor's "UTF-8 with BOM" or a classic Mac editor writes."""
    path = tmp_path / "bom_cr.curv"
    path.write_bytes(b"\xef\xbb\xbf" + ADAM.replace("\n", "\r").encode())
    cls = curvc.load(path)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    cls([p], lr=0.1).step()
    assert torch.allclose(p.detach(), torch.full((2,), 0.9))  # Adam's first step: lr * sign(g)


def test_byte_order_mark_does_not_shift_columns():
    err = error_of("\ufeffoptimizer Adam $\n")
    assert str(err).startswith("big.curv:1:16: error: unexpected character '$'")


def test_old_mac_line_ends_count_lines_as_an_editor_does():
    bad = ADAM.replace("structure diagonal", "structure diagnal").replace("\n", "\r")
    # Line 7 of specs/adam.curv is the structure line.
    assert str(error_of(bad)).startswith("big.curv:7:11: error: unknown structure 'diagnal'")


# --- long lines in error messages -------------------------------------------------

def quoted_and_caret(err: CurvError) -> tuple[str, int]:
    """The quoted line and the index in it of the first '^' of the caret line."""
    lines = str(err).split("\n")
    assert lines[1].startswith("    ") and set(lines[2].strip()) == {"^"}, str(err)
    return lines[1], lines[2].index("^")


def test_megabyte_name_gives_a_short_message():
    err = error_of(ADAM.replace("structure diagonal", "structure " + "d" * 1_000_000))
    assert err.key == "name.unknown_form"
    text = str(err)
    assert len(text) < 1000
    quoted, caret = quoted_and_caret(err)
    assert len(quoted) <= 4 + 200 + 3
    assert quoted[caret - 1:caret + 1] == " d"  # the caret starts under the name


def test_caret_stays_under_a_fault_far_into_a_long_line():
    line = "hyper lr = 1e-3, " + ", ".join(f"h{i} = {i}" for i in range(2000))
    at = len(line) - 100  # a '$' near the end of a ~20,000-character line
    bad = ADAM.replace("hyper lr = 1e-3, betas", line[:at] + "$" + line[at:] + ", betas")
    err = error_of(bad)
    assert str(err).startswith(f"big.curv:5:{at + 1}: error: unexpected character '$'")
    quoted, caret = quoted_and_caret(err)
    assert len(quoted) <= 4 + 200 + 2 * 3
    assert quoted[caret] == "$"
    assert quoted.startswith("    ...")  # the start of the line is left out, and says so


def test_tabs_before_a_fault_in_a_long_line_keep_the_caret_aligned():
    bad = ADAM.replace("length    gradient_norm", "length\t\t" + "\t" * 500 + "gradient_nrom")
    quoted, caret = quoted_and_caret(error_of(bad))
    assert len(quoted) <= 4 + 200 + 2 * 3
    assert quoted[caret:caret + 13] == "gradient_nrom"


# --- a 20 MB spec, in bounded memory -------------------------------------------

# The spec's lines with blank, white-space and comment lines between them, one
# 10 MB run of blank lines (the old lexer held 4 GB of regex state for it) and a
# 3 MB comment line. The address space is capped, so a regression fails with
# MemoryError instead of taking the machine's memory.
CHILD = textwrap.dedent('''
    import json, resource, sys, tracemalloc
    import curvc

    spec = open(sys.argv[1]).read()
    curvc.to_ir(spec)  # build the parser first: its tables are not the input's cost
    lines = spec.split("\\n")
    between = "   \\t \\n" * 50_000 + "# a comment line, one of many\\n" * 10_000 + "\\n" * 50_000
    big = "".join(line + "\\n" + between for line in lines[:5])
    big += "\\n" * 10_000_000 + "".join(line + "\\n" + between for line in lines[5:])
    big += "# " + "x" * 3_000_000 + "\\n"
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    cap = mapped + 50 * len(big)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    tracemalloc.start()  # every Python allocation, the regex engine's included
    opt = curvc.to_ir(big, "big.curv")
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"size": len(big), "peak": peak, "name": opt.name,
                      "hypers": [h.name for h in opt.hypers]}))
''')


def test_a_20_megabyte_spec_parses_in_memory_linear_in_its_size(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "specs" / "adam.curv")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["size"] > 20_000_000
    assert out["name"] == "Adam"
    assert out["hypers"] == [h.name for h in curvc.to_ir(ADAM).hypers]
    # A few copies of the text are expected (comments blanked, the line-end token);
    # the old lexer kept ~400 bytes of regex state per line of a blank run.
    assert out["peak"] < 20 * out["size"], out
