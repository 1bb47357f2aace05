"""The plan dump prints each shared value once (curvc.plan_text)."""
import re
from pathlib import Path

from curvc import compiler
from curvc.plan import Load, Op, Scalar, Store
from curvc.plan_text import format_plan


def test_a_value_read_twice_is_printed_once_and_referenced():
    shared = Op("mul", (Load("grad"), Scalar("lr")))
    stores = (Store("exp_avg", Op("add", (Load("exp_avg"), shared))),
              Store("param", Op("sub", (Load("param"), shared))))
    text = format_plan(stores)
    assert text.count("Op(op='mul'") == 1
    assert text.startswith("%0 = Op(op='mul'")
    assert len(re.findall(r"%0\b", text)) == 3  # its definition and its two readers


def test_a_value_read_once_stays_inline():
    text = format_plan((Store("param", Op("sub", (Load("param"), Load("grad")))),))
    assert "%" not in text


def test_every_reference_in_a_shipped_dump_is_defined_before_use():
    spec = Path(__file__).resolve().parent.parent / "specs/distributed_shampoo.curv"
    text = compiler.dump(spec.read_text(),
                         "distributed_shampoo.curv", "lower")
    defined = set()
    for line in text.splitlines():
        head = re.match(r"%(\d+) = ", line)
        used = set(re.findall(r"%(\d+)\b", line[head.end():] if head else line))
        assert used <= defined, line
        if head:
            defined.add(head.group(1))
    assert defined  # the spec shares values between its stores
