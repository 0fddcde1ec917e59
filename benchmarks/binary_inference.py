#!/usr/bin/env python
"""Binary inference (issue 16): OpenVINO's bit-packed BinaryConvolution vs the same network in fp32
(OpenVINO, PyTorch eager), per layer and whole network, and the IR's size vs the paper's count.

Models: decoupled, weight_bits 1, paper widths, random weights, BN statistics near the data's (every
binary activation fires on a good share of inputs). ``ov binary``: ``to_openvino``'s IR, checked by
``verify`` first (a broken export is never timed). ``ov fp32``: its twin, the exporter's own walk
with each BinaryConvolution replaced by a float Convolution of ``alpha * s(W)`` reading {0, 1}
activations from GreaterEqual(BN(z), 1/2) -> Convert. Without FakeQuantize(levels=2) the CPU plugin
cannot turn it back into a BinaryConvolution; checked on its runtime graph and against float64
PyTorch, and each conv's kernel is printed per layer.

One IR per batch size (static shapes). Whole network: median latency of synchronous inferences after
warm-up, the two IRs interleaved (A B B A ..: load hits both alike), PyTorch in a block of its own
(its OpenMP threads never spin beside OpenVINO's); throughput = batch / median latency. Per layer:
OpenVINO's profiling counters (separate compilations), median per runtime node. Size: batch-1
``model.xml`` + ``model.bin`` in Mbit (10^6 bits) vs ``cost_report`` of the decoupled model.
Verdicts are printed; exit status 0 whatever they say, non-zero on errors and failed checks.

Run:  .venv/bin/python benchmarks/binary_inference.py [--models resnet18,alexnet,vgg7]
      [--batches 1,8] [--threads 1,all] [--repeats 20] [--warmup 3] [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints
import torch
from torch import nn

from binaryduo import models
from binaryduo.models.cost import cost_report
from binaryduo.models.layers import ActQuant
from binaryduo.models.testing import firing_rates, randomize_batchnorm_near_data_
from binaryduo.models.resnet import FINAL_WIDTH, STAGE_BASELINE, STAGE_COUPLED
from binaryduo.trainer.export import (ExportSummary, LayerRecord, ir_file_bytes, save_ir,
                                      to_openvino, verify)
from binaryduo.trainer.export.fp32_twin import fp32_twin
from binaryduo.trainer.export.verify import (compile_for_verification, reference_logits,
                                             run_compiled)

#: ResNet-18 3x3 binary conv vs fp32 twin (wide: 256/512-channel stages); whole ResNet-18 vs
#: OpenVINO fp32 and PyTorch fp32 at batch 1, 1 thread; IR size vs the paper rule (issue 16)
CONV_TARGET, WIDE_CONV_TARGET = 2.5, 4.0
NET_VS_OV_TARGET, NET_VS_TORCH_TARGET = 2.5, 5.0
SIZE_TARGET = 1.3
#: (full, --quick) build options. Full: the registry's defaults, i.e. the issue's sizes (resnet18
#: and alexnet 1000 classes at 224 px, vgg7 10 classes at 32 px); quick: seconds on 2 cores.
SETUPS = {"resnet18": ({}, {"input_size": 64, "width_mult": 0.5}),
          "alexnet": ({}, {"width_mult": 0.25}), "vgg7": ({}, {"width_mult": 0.5})}


@torch.no_grad()
def random_decoupled(name: str, options: dict, seed: int) -> nn.Module:
    """A random coupled model with BN statistics near the data's (``randomize_batchnorm_near_data_``:
    units straddle the thresholds), decoupled."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = models.build(name, "coupled", weight_bits=1, **options)
    c = model.config
    images = torch.randn(8, c.in_channels, c.input_size, c.input_size, generator=gen)
    randomize_batchnorm_near_data_(model, images, gen)
    return models.decouple(model.eval()).eval()


def runtime_nodes(compiled: ov.CompiledModel, convs: list[str], reads: dict[str, str],
                  known: set[str]) -> tuple[dict[str, dict], Counter]:
    """(conv name -> its runtime node: node, type, kernel; layerType counts), by the nodes'
    ``originalLayersNames``. A float conv merged with the BN Multiply after it loses its name there:
    it is then the one Convolution that reads its activation (through Reorders) and carries no
    other layer's name (``known``)."""
    owners, info = {}, {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt, name = op.get_rt_info(), op.get_friendly_name()
        t = {k: rt[k].astype(str) if k in rt else "" for k in
             ("layerType", "primitiveType", "originalLayersNames")}
        info[name] = {"node": name, "type": t["layerType"], "kernel": t["primitiveType"],
                      "names": set(filter(None, t["originalLayersNames"].split(",")))}
        owners.update(dict.fromkeys(info[name]["names"], op))

    def readers(op):
        for node in (t.get_node() for out in op.outputs() for t in out.get_target_inputs()):
            entry = info[node.get_friendly_name()]
            yield from readers(node) if entry["type"] == "Reorder" else [entry]

    found = {}
    for conv in convs:
        node = info[owners[conv].get_friendly_name()] if conv in owners else None
        if node is None and reads.get(conv) in owners:
            candidates = [r for r in readers(owners[reads[conv]])
                          if r["type"] == "Convolution" and not known & r["names"]]
            node = candidates[0] if len(candidates) == 1 else None
        found[conv] = node or dict.fromkeys(("node", "type", "kernel"), "missing")
    return found, Counter(i["type"] for i in info.values())


def check_twin(twin: ov.Model, reads: dict[str, str], model: nn.Module, summary: ExportSummary,
               images: torch.Tensor, core: ov.Core) -> dict:
    """The twin computes the model (float64 PyTorch logits) with float convs only."""
    compiled = compile_for_verification(twin, core, batch=len(images))
    logits = run_compiled(compiled, images.numpy()).astype(np.float64)
    reference = reference_logits(model, images).numpy()
    nodes, types = runtime_nodes(compiled, summary.binary_layers, reads,
                                 {layer.name for layer in summary.layers})
    kinds = sorted({node["type"] for node in nodes.values()})
    kernels = sorted({node["kernel"] for node in nodes.values()})
    identical = int((logits.argmax(1) == reference.argmax(1)).sum())
    return {"identical_predictions": identical, "samples": len(images),
            "max_abs_dlogit": float(np.abs(logits - reference).max()),
            "binary_convolution_nodes": types["BinaryConvolution"], "conv_layer_types": kinds,
            "conv_kernels": kernels, "runtime_layer_types": dict(sorted(types.items())),
            "passed": (kinds == ["Convolution"] and all(k.endswith("_f32") for k in kernels)
                       and types["BinaryConvolution"] == 0 and identical == len(images))}


def ov_compile(core: ov.Core, ir: ov.Model, threads: int, profiling: bool) -> ov.CompiledModel:
    return core.compile_model(ir, "CPU", {
        hints.inference_precision: ov.Type.f32,
        hints.performance_mode: hints.PerformanceMode.LATENCY, props.streams.num: 1,
        props.inference_num_threads: threads, props.enable_profiling: profiling})


def interleaved(steps: list, warmup: int, repeats: int, clock: bool = False) -> list[list]:
    """Each step's results (``clock``: ms) in ``repeats`` rounds after ``warmup``: A B, B A, .."""
    samples: list[list] = [[] for _ in steps]
    for i in range(warmup + repeats):
        for k in (range(len(steps)) if i % 2 == 0 else reversed(range(len(steps)))):
            start = time.perf_counter()
            value = steps[k]()
            if i >= warmup:
                samples[k].append((time.perf_counter() - start) * 1e3 if clock else value)
    return samples


def node_times(request, feed: dict) -> dict[str, float]:
    request.infer(feed)
    return {p.node_name: p.real_time.total_seconds() * 1e3 for p in request.profiling_info
            if p.status == ov.ProfilingInfo.Status.EXECUTED}


def conv_target(model: nn.Module, layer: LayerRecord) -> float | None:
    """The issue's ratio target of a ResNet-18 3x3 binary conv (None: no target)."""
    config = model.config
    if config.name != "resnet18" or layer.kernel != (3, 3):
        return None
    wide = {config.width(b, c) for b, c in zip(STAGE_BASELINE, STAGE_COUPLED) if b >= 256}
    wide.add(config.width(FINAL_WIDTH, FINAL_WIDTH))
    return WIDE_CONV_TARGET if layer.out_channels in wide else CONV_TARGET


def measure_model(name: str, options: dict, args, core: ov.Core, result: dict) -> bool:
    model = random_decoupled(name, options, args.seed)
    config = model.config
    gen = torch.Generator().manual_seed(args.seed + 1)
    shape1 = (1, config.in_channels, config.input_size, config.input_size)
    images = torch.randn(2, *shape1[1:], generator=gen)  # verify: a couple (exact binary layers)
    ir1, summary = to_openvino(model, shape1)
    report = verify(ir1, model, images, core=core)
    twin1 = fp32_twin(model, shape1)  # checked here, timed below at batch 1
    twin = check_twin(*twin1, model, summary, images, core)
    rates = firing_rates(model, images, ActQuant)
    print(f"\n== {name} decoupled, {config.input_size} px, options {options or 'paper defaults'}: "
          f"{summary.binary_convolutions} binary convs; activations fire on "
          f"{min(rates):.0%}..{max(rates):.0%} (median {statistics.median(rates):.0%})")
    print(f"verify binary IR vs float64 PyTorch: "
          f"{'PASS' if report.passed else 'FAIL: ' + report.reason}; predictions "
          f"{report.identical_predictions}/{report.samples} identical, max |dlogit| "
          f"{report.max_abs_dlogit:.2g}; {report.binary_kernels} BinaryConvolution kernels "
          f"{report.binary_primitive_types}\nfp32 twin check: "
          f"{'PASS' if twin['passed'] else 'FAIL'}; predictions {twin['identical_predictions']}/"
          f"{twin['samples']} identical, max |dlogit| "
          f"{twin['max_abs_dlogit']:.2g}; its convs run as {twin['conv_layer_types']} "
          f"{twin['conv_kernels']}, {twin['binary_convolution_nodes']} BinaryConvolution nodes")
    entry = result["models"][name] = {
        "options": options, "input_size": config.input_size, "binary_convs": summary.binary_layers,
        "firing_rate": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
        "verify": report.to_dict(), "fp32_twin": twin}
    if not (report.passed and twin["passed"]):
        print(f"error: {name}: the {'fp32 twin' if report.passed else 'export'} failed its check; "
              "not timed")
        return False

    with tempfile.TemporaryDirectory() as tmp:
        ir_bytes = ir_file_bytes(save_ir(ir1, tmp))
    costs = cost_report(model)
    ratio = ir_bytes * 8 / 1e6 / costs.mbit
    entry["size"] = {"ir_bytes": ir_bytes, "ir_mbit": ir_bytes * 8 / 1e6,
                     "paper_mbit": costs.mbit, "ratio": ratio, "target": SIZE_TARGET,
                     "verdict": "PASS" if ratio <= SIZE_TARGET else "FAIL"}
    shapes = {c.name: f"{c.shape} @{c.output}" for c in costs.layers}
    records = {layer.name: layer for layer in summary.layers}
    for batch in args.batches:
        shape = (batch, *shape1[1:])
        twin_ir, reads = twin1 if batch == 1 else fp32_twin(model, shape)
        irs = (ir1 if batch == 1 else to_openvino(model, shape)[0], twin_ir)
        feed = {0: torch.randn(shape, generator=gen).numpy()}
        for threads in args.threads:
            time_network(model, irs, feed, threads, args, core, result)
            compiled = [ov_compile(core, ir, threads, True) for ir in irs]
            runs = interleaved([lambda r=c.create_infer_request(): node_times(r, feed)
                                for c in compiled], args.warmup, args.repeats)
            nodes = [runtime_nodes(c, summary.binary_layers, reads, set(records))[0]
                     for c in compiled]
            for layer in summary.binary_layers:
                found = [n[layer] for n in nodes]
                if [f["type"] for f in found] != ["BinaryConvolution", "Convolution"]:
                    raise RuntimeError(f"{name} {layer} runs as {found} (binary IR, fp32 twin)")
                bin_ms, fp_ms = (statistics.median(t.get(f["node"], math.nan) for t in samples)
                                 for f, samples in zip(found, runs))
                target = conv_target(model, records[layer])
                ratio = fp_ms / bin_ms if bin_ms > 0 else math.nan  # counters tick in whole us
                result["layers"].append({
                    "model": name, "batch": batch, "threads": threads, "layer": layer,
                    "shape": shapes.get(layer, ""), "binary_ms": bin_ms,
                    "binary_kernel": found[0]["kernel"], "ov_fp32_ms": fp_ms,
                    "ov_fp32_kernel": found[1]["kernel"], "ratio": ratio, "target": target,
                    "verdict": target and ("PASS" if ratio >= target else "FAIL")})
    return True


def time_network(model: nn.Module, irs, feed: dict, threads: int, args, core: ov.Core,
                 result: dict) -> None:
    """One whole-network row: binary and fp32 IRs interleaved, then PyTorch."""
    requests = [ov_compile(core, ir, threads, False).create_infer_request() for ir in irs]
    bin_ms, fp_ms = (statistics.median(t) for t in interleaved(
        [lambda r=r: r.infer(feed) for r in requests], args.warmup, args.repeats, clock=True))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            images = torch.from_numpy(feed[0])
            torch_ms = statistics.median(interleaved(
                [lambda: model(images)], args.warmup, args.repeats, clock=True)[0])
    finally:
        torch.set_num_threads(previous)
    batch = len(feed[0])
    row = {"model": model.config.name, "px": model.config.input_size, "batch": batch,
           "threads": threads, "torch_ms": torch_ms, "ov_fp32_ms": fp_ms, "binary_ms": bin_ms,
           **{f"{k}_img_s": batch * 1e3 / ms for k, ms in
              (("torch", torch_ms), ("ov_fp32", fp_ms), ("binary", bin_ms))},
           "x_ov_fp32": fp_ms / bin_ms, "x_torch": torch_ms / bin_ms}
    result["whole"].append(row)
    print(f"  batch {batch}, {threads} thread(s): binary {bin_ms:.2f} ms, ov fp32 {fp_ms:.2f} ms "
          f"({row['x_ov_fp32']:.2f}x), torch {torch_ms:.2f} ms ({row['x_torch']:.2f}x)",
          flush=True)


def _columns(spec: str) -> list[tuple[str, str, str]]:
    """``"header=key:format ..."`` (``_`` in a header is a space) -> (header, key, format)."""
    return [(h.replace("_", " "), *rest.split(":")) for h, rest in
            (item.split("=") for item in spec.split())]


WHOLE = _columns("model=model:<9 px=px:>4 batch=batch:>5 thr=threads:>3 torch_ms=torch_ms:>9.2f "
                 "ov32_ms=ov_fp32_ms:>9.2f bin_ms=binary_ms:>8.2f torch/s=torch_img_s:>8.1f "
                 "ov32/s=ov_fp32_img_s:>8.1f bin/s=binary_img_s:>8.1f x_ov32=x_ov_fp32:>7.2f "
                 "x_torch=x_torch:>7.2f")
LAYERS = _columns("model=model:<9 batch=batch:>5 thr=threads:>3 layer=layer:<24 shape=shape:<26 "
                  "bin_ms=binary_ms:>7.3f bin_kernel=binary_kernel:<12 ov32_ms=ov_fp32_ms:>8.3f "
                  "ov32_kernel=ov_fp32_kernel:<20 x=ratio:>6.2f target=target_text:>6 "
                  "verdict=verdict_text:")
SIZES = _columns("model=model:<9 IR_bytes=ir_bytes:>10 IR_Mbit=ir_mbit:>8.2f "
                 "paper_Mbit=paper_mbit:>10.2f ratio=ratio:>6.2f target=target_text:>7 "
                 "verdict=verdict:")


def print_table(title: str, columns: list, rows: list[dict]) -> None:
    head = " ".join(format(header, fmt.split(".")[0]) for header, _, fmt in columns)
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for row in rows:
        print(" ".join(format(row[key], fmt) for _, key, fmt in columns))


def print_tables(result: dict) -> None:
    print_table("whole network (median latency ms; img/s = batch / latency; x = binary speed-up)",
                WHOLE, result["whole"])
    print_table("per layer (OpenVINO profiling, median ms of each conv's node; x = ov32/bin)",
                LAYERS, [{**r, "target_text": "-" if r["target"] is None else f">={r['target']:g}",
                          "verdict_text": r["verdict"] or "-"} for r in result["layers"]])
    print_table("size (batch-1 IR model.xml + model.bin vs the paper rule of cost_report; "
                "Mbit = 10^6 bits)", SIZES,
                [{"model": name, **e["size"], "target_text": f"<={SIZE_TARGET:g}"}
                 for name, e in result["models"].items() if "size" in e])


def targets(result: dict) -> list[dict]:
    """The issue's verdicts, from whatever this run measured."""
    out = []
    conv_rows = [r for r in result["layers"] if r["target"]]
    for config in dict.fromkeys((r["batch"], r["threads"]) for r in conv_rows):
        rows = [r for r in conv_rows if (r["batch"], r["threads"]) == config]
        failed = [r["layer"] for r in rows if r["verdict"] != "PASS"]
        out.append((f"resnet18 3x3 binary convs >= {CONV_TARGET:g}x / {WIDE_CONV_TARGET:g}x ov "
                    f"fp32 (batch {config[0]}, {config[1]} thr)", f"{len(rows) - len(failed)}/"
                    f"{len(rows)} pass" + (f" (fail: {', '.join(failed)})" if failed else ""),
                    "FAIL" if failed else "PASS"))
    for r in result["whole"]:
        if (r["model"], r["batch"], r["threads"]) != ("resnet18", 1, 1):
            continue
        for key, target, label in (("x_ov_fp32", NET_VS_OV_TARGET, "OpenVINO fp32"),
                                   ("x_torch", NET_VS_TORCH_TARGET, "PyTorch fp32")):
            out.append((f"resnet18 whole net >= {target:g}x {label} (batch 1, 1 thr)",
                        f"{r[key]:.2f}x", "PASS" if r[key] >= target else "FAIL"))
    out += [(f"{name} IR size <= {SIZE_TARGET:g}x paper rule", f"{e['size']['ratio']:.2f}x",
             e["size"]["verdict"]) for name, e in result["models"].items() if "size" in e]
    return [dict(zip(("target", "measured", "verdict"), t)) for t in out]


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def _int_list(text: str, all_value: int = 0) -> list[int]:
    values = [all_value if t.strip() == "all" and all_value else int(t) for t in text.split(",")]
    if min(values) < 1:
        raise ValueError("values must be >= 1")
    return list(dict.fromkeys(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SETUPS), help="from %(default)s")
    parser.add_argument("--batches", help="comma-separated (default 1,8; --quick 1)")
    parser.add_argument("--threads", default="1,all", help="numbers or 'all' (default %(default)s)")
    parser.add_argument("--repeats", type=int, help="timed runs per engine (default 20; --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: reduced widths/sizes, "
                        "batch 1, few repeats (the verdicts are then not the issue's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names or any(n not in SETUPS for n in names):
        parser.error(f"--models: choose from {', '.join(SETUPS)}")
    all_threads = len(os.sched_getaffinity(0))
    try:
        args.batches = _int_list(args.batches or ("1" if args.quick else "1,8"))
        args.threads = _int_list(args.threads, all_threads)
    except ValueError as error:
        parser.error(f"--batches/--threads: {error}")
    args.repeats = max(args.repeats or (3 if args.quick else 20), 1)
    args.warmup = (1 if args.quick else 3) if args.warmup is None else max(args.warmup, 0)

    print("binary inference: OpenVINO BinaryConvolution vs its fp32 twin vs PyTorch fp32"
          + (" (QUICK: reduced models, verdicts are not the issue's)" if args.quick else ""))
    print(f"openvino {ov.__version__}, torch {torch.__version__}; batches {args.batches}, threads "
          f"{args.threads} ('all' = {all_threads}), {args.warmup} warm-up + {args.repeats} timed "
          f"runs, seed {args.seed}")
    print(f"load average before: {_load()}")
    result = {"benchmark": "binary_inference", "quick": args.quick, "batches": args.batches,
              "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
              "versions": {"openvino": ov.__version__, "torch": torch.__version__},
              "load_before": _load(), "models": {}, "whole": [], "layers": []}
    core = ov.Core()
    checked = [measure_model(n, SETUPS[n][1 if args.quick else 0], args, core, result)
               for n in names]
    result["load_after"] = _load()
    print(f"\nload average after: {result['load_after']}")
    print_tables(result)
    result["targets"] = targets(result)
    print("\ntargets (issue 16)" + (" -- quick run: reduced models, not the issue's setting"
                                    if args.quick else ""))
    for t in result["targets"]:
        print(f"  {t['verdict']:<4}  {t['target']}: {t['measured']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0 if all(checked) else 1


if __name__ == "__main__":
    sys.exit(main())
