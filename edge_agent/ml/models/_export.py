"""Makes an architecture's ONNX graph for the validators from its torch module (torch,
onnxscript): ``python -m edge_agent.ml.models export [NAME ...]``.

``torch.onnx.export`` (the torch.export-based exporter) traces ``module()`` with a dynamic
batch; the parameters it stores as initializers then become graph inputs of the same names
(the ``state_dict`` keys), so one ONNX Runtime session serves every model of the
architecture (``edge_agent.ml.onnx_eval``). What would make the file differ between machines
or runs (source paths and stack traces in metadata, value_info) is dropped; the graph is
checked against ``LAYOUT`` and by ``onnx.checker``.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from pathlib import Path

from . import get, names

OPSET = 18  # the exporter's own opset (onnxruntime >= 1.14 runs it)
IR_VERSION = 8  # lowered from the exporter's: the graph uses nothing newer; onnxruntime >= 1.17 reads it


def export_graph(name: str):
    """The ONNX ModelProto of architecture ``name`` with its weights as graph inputs."""
    import contextlib
    import logging

    import onnx
    import torch
    from onnx import TensorProto, helper

    arch = get(name)
    model = arch.module().eval()
    state = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    if state != list(arch.layout):
        raise ValueError(f"{name}: the module's state_dict {state} is not LAYOUT {list(arch.layout)}")
    x = torch.zeros(2, 1, 28, 28)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (x,), dynamo=True, input_names=["x"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET, optimize=True,
            verbose=False,
        )  # fmt: skip
    proto = program.model_proto
    g = proto.graph
    params = dict(arch.layout)
    inits = {t.name: t for t in g.initializer}
    missing = sorted(set(params) - set(inits))
    if missing:
        raise ValueError(f"{name}: the exported graph has no initializers {missing} (has {sorted(inits)})")
    # the weights become inputs; what else the exporter made constant stays an initializer
    kept = [t for t in g.initializer if t.name not in params]
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.input[1:]
    g.input.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, list(s)) for k, s in arch.layout)
    for vi, dims in ((g.input[0], ["batch", 1, 28, 28]), (g.output[0], ["batch", 10])):
        vi.CopyFrom(helper.make_tensor_value_info(vi.name, TensorProto.FLOAT, dims))
    if [i.name for i in g.input][:1] != ["x"] or [o.name for o in g.output] != ["logits"]:
        raise ValueError(f"{name}: expected input x and output logits, got {[o.name for o in g.output]}")
    # nothing machine- or run-specific: no source paths, stack traces or exporter versions
    del g.value_info[:]
    del proto.metadata_props[:]
    for n in g.node:
        del n.metadata_props[:]
        n.doc_string = ""
    g.doc_string = proto.doc_string = ""
    g.name = f"posbfl_{name}"
    used = {n.domain for n in g.node}
    imports = [o for o in proto.opset_import if o.domain in used or o.domain == ""]
    del proto.opset_import[:]
    proto.opset_import.extend(imports)
    if proto.functions:
        raise ValueError(f"{name}: the exported graph has local functions; expected plain ONNX operators")
    proto.producer_name, proto.producer_version = "posbfl-testbed", ""
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return proto


def write_graph(name: str, path: Path | None = None) -> Path:
    """Export ``name`` and write its graph (default: beside its file, ``NAME.onnx``)."""
    import onnx

    proto = export_graph(name)
    path = Path(path) if path is not None else get(name).graph_path
    onnx.save_model(proto, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_agent.ml.models", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="(re)write NAME.onnx beside NAME.py from its torch module")
    ex.add_argument("names", nargs="*", metavar="NAME", help=f"architectures (default: all of {', '.join(names())})")
    sub.add_parser("list", help="the architectures and their parameter counts")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for n in names():
            a = get(n)
            print(f"{n:<10} {a.n_params:>10,}  {a.summary}")
        return 0
    for n in args.names or names():
        try:
            get(n)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        path = write_graph(n)
        print(f"{n}: wrote {path} ({path.stat().st_size} bytes)")
    return 0
