"""The exporter benchmark (same as ``care-export bench``): eager PyTorch reference, exported
artifact and plain backbone, interleaved, for ViT-B/16 at T in {1, 10, 100, 301}, batch 1 and 8.

    python benchmarks/bench_export.py --ckpt big/   # care-export synth-ckpt -o big/ --tasks 301 ...
"""

from care_export.cli.bench import bench_command

if __name__ == "__main__":
    bench_command()
