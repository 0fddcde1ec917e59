"""Deployable binary networks: a trained ``bnn`` or ``decoupled`` model exported to an OpenVINO IR
whose binary convolutions run OpenVINO's bit-packed xnor-popcount kernel, verified against PyTorch.

    ir, summary = to_openvino(model, (1, 3, 32, 32))   # ExportRefused: no binary form
    save_ir(ir, "export/")                             # export/model.xml, export/model.bin
    report = verify(ir, model, images)                 # report.passed, report.to_dict()
"""
from .openvino_ir import (ExportRefused, ExportSummary, LayerRecord, exportable_model,
                          ir_file_bytes, save_ir, to_openvino)
from .verify import VerificationReport, compile_for_verification, verify

__all__ = [
    "ExportRefused", "ExportSummary", "LayerRecord", "VerificationReport",
    "compile_for_verification", "exportable_model", "ir_file_bytes", "save_ir", "to_openvino",
    "verify",
]
