"""Measuring and calibrating cache backends on a running engine: the library behind `teaserve bench`,
`teaserve calibrate`, `teaserve train-default` and `benchmarks/`.

- `sweeps`: what a sweep runs by default (step counts, quality levels, the tuning grid) and `Variant`; imports
  nothing heavy.
- `metrics`: PSNR and SSIM of an image against its uncached twin.
- `prompts`: the prompts (and, for the embedded model, the caption checker) a sweep runs.
- `backends`: which cache backends a sweep runs.
- `bench`: every backend against uncached, side by side in one run (`run_bench`), and their frontiers.
- `calibration`: what each backend fits from uncached runs, then its quality table, into one profile
  (`calibrate`).
"""
