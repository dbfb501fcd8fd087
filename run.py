#!/usr/bin/env python3
"""Retarget every image of a Parquet manifest with its own InGAN.

    python run.py manifests/example.parquet --output output/example --iterations 600
    ray submit cluster.yaml run.py s3://bucket/manifest.parquet --output s3://bucket/out

Self-contained on purpose: ``ray submit`` copies only this file to the head node, so everything
it needs comes from the ``ingan-batch`` package installed on every node (see cluster.yaml).
"""

import sys

try:
    from pipeline.driver import main
except ImportError as exc:  # pragma: no cover - only without the package installed
    sys.exit(f"error: the ingan-batch package is not installed here ({exc}); run: pip install -e .")

if __name__ == "__main__":
    sys.exit(main())
