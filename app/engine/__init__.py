"""The pure core of the loop: decide the next action, fold outcomes into state.

This package imports no framework and performs no I/O (tests/test_engine_purity.py
enforces it), so the loop's logic is tested in milliseconds.
"""
