"""Run by the test suite in the optimum side venv (Makefile: .venv-optimum, transformers < 4.58):
build each family's tiny model there, save it, and export it with Hugging Face optimum's ONNX
exporter (text-generation-with-past: input_ids, attention_mask, position_ids, past_key_values.*).

    .venv-optimum/bin/python tests/optimum_export.py OUT_DIR FAMILY...   -> OUT_DIR/FAMILY/{hf,onnx}
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import families  # noqa: E402
from optimum.exporters.onnx import main_export  # noqa: E402

out = sys.argv[1]
for family in sys.argv[2:]:
    hf, onnx_dir = os.path.join(out, family, "hf"), os.path.join(out, family, "onnx")
    families.build(family).save_pretrained(hf)
    main_export(hf, output=onnx_dir, task="text-generation-with-past")
