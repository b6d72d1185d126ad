"""Measuring and calibrating step caches on a running engine: the library behind `teaserve bench`,
`teaserve calibrate`, `teaserve train-default` and `benchmarks/`.

- `sweeps`: what a sweep runs by default (thresholds, calibration step counts) and `Variant`; imports nothing heavy.
- `metrics`: PSNR and SSIM of an image against its uncached twin.
- `prompts`: the prompts (and, for the embedded model, the caption checker) a sweep runs.
- `bench`: cached against uncached, side by side in one run (`run_bench`).
- `calibration`: fitting TeaCache's rescaling polynomial over several step counts (`calibrate`).
"""
