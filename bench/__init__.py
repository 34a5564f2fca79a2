"""sdxl-ckpt benchmarks: conversion wall time and peak memory at tiny and full SDXL size, against a plain copy
of the same bytes and against the usual load-everything converter. Run ``python -m bench --help``."""
