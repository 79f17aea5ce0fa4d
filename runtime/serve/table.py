"""The wire contract of every task as a markdown table (`kiln tasks`), made from the task specs and
the kiln.v1 codecs, so docs/serving.md's table is the code's and a test keeps it so."""

from __future__ import annotations

from kiln.runtime.serve.kserve_codec import CODECS as KSERVE
from kiln.runtime.serve.typed_codec import CODECS
from kiln.runtime.tasks import SPECS
from kiln.runtime.tasks.spec import Param, Tensor


def _tensor(t: Tensor) -> str:
    shape = ", ".join("N" if d == -1 and t.per_row else "K" if d == -1 else str(d) for d in t.shape)
    return f"`{t.name}` {t.datatype} [{shape}]" + (" (optional)" if t.optional else "")


def _param(p: Param) -> str:
    default = "" if p.default is None else f" = {str(p.default).lower() if p.kind is bool else repr(p.default)}"
    kind = "list of str" if p.kind is list else p.kind.__name__
    return f"`{p.name}` {kind}{default}" + (f": {p.help}" if p.help else "")


def markdown() -> str:
    lines = [
        "| task | KServe inputs | KServe outputs | parameters | kiln.v1 RPC |",
        "|---|---|---|---|---|",
    ]
    for spec in SPECS.values():
        inputs, outputs = "<br>".join(map(_tensor, spec.inputs)), "<br>".join(map(_tensor, KSERVE[spec.task].outputs))
        parameters = "<br>".join(map(_param, spec.parameters))
        lines.append(f"| {spec.task} | {inputs} | {outputs} | {parameters} | `{CODECS[spec.task].rpc}` |")
    return "\n".join(lines)
