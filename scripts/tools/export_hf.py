#!/usr/bin/env python3
"""Exports a Hugging Face causal LM to the ONNX graph betadpo trains (`--help` for the options).

The exporter lives in `betadpo_py.export_hf`, which the fixture, benchmark and check scripts import too.
"""
from betadpo_py.export_hf import main

if __name__ == "__main__":
    main()
