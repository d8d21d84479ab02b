"""Inference engines behind one protocol (`base.Engine`), one module per implementation."""
