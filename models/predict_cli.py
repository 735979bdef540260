"""`python -m models.predict_cli RUN_DIR FILE`: one prediction as one JSON line on stdout.

Run by the API in a subprocess so the API process never imports torch. Exit 0 with
{"class", "confidence", "probabilities"}; 2 with {"error"} when the file cannot be read as an image;
4 when torch (the [worker] extra) is missing; 1 on any other failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EXIT_BAD_INPUT, EXIT_NO_TORCH = 2, 4


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(json.dumps({"error": "usage: python -m models.predict_cli RUN_DIR FILE"}))
        return 1
    run_dir, dicom_path = Path(args[0]), Path(args[1])
    try:
        import torch  # noqa: F401  (fail clearly when the worker extra is missing)
    except ImportError:
        print(json.dumps({"error": "predictions need the [worker] extra (torch) on the API machine"}))
        return EXIT_NO_TORCH
    from pydicom.errors import InvalidDicomError

    from models.predict import predict_file
    from models.preprocess import PreprocessError

    try:
        result = predict_file(run_dir, dicom_path)
    except (PreprocessError, InvalidDicomError) as exc:  # the upload is at fault
        print(json.dumps({"error": f"cannot read the image: {exc}"[:500]}))
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - reported to the API as one JSON line
        print(json.dumps({"error": f"prediction failed: {type(exc).__name__}: {exc}"[:500]}))
        return 1
    print(json.dumps({"class": result["class"], "confidence": float(result["confidence"]),
                      "probabilities": {k: float(v) for k, v in result["probabilities"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
