"""Write a Hugging Face image parquet file (columns: image {bytes, path}, label) as a dataset zip in the StyleGAN
layout that `"type": "zip"` reads: the encoded images unchanged, `00000/img00000000.<ext>`, plus dataset.json.
For GPU machines without the datasets package:

    python benchmarks/parquet_to_zip.py ../shared/data/cifar10/train.parquet .carry/cifar10.zip
"""

import argparse
import json
import zipfile
from pathlib import Path

import pyarrow.parquet as pq


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parquet")
    parser.add_argument("zip")
    parser.add_argument("--image-key", default="image")
    parser.add_argument("--class-key", default="label", help="'' for an unlabelled dataset")
    args = parser.parse_args()
    table = pq.read_table(args.parquet)
    images = table.column(args.image_key).to_pylist()
    labels = table.column(args.class_key).to_pylist() if args.class_key else None
    Path(args.zip).parent.mkdir(parents=True, exist_ok=True)
    names = []
    with zipfile.ZipFile(args.zip, "w", zipfile.ZIP_STORED) as archive:  # JPEG/PNG bytes do not compress further
        for i, image in enumerate(images):
            data = image["bytes"]
            ext = ".png" if data[:4] == b"\x89PNG" else ".jpg"
            names.append(f"{i // 1000:05d}/img{i:08d}{ext}")
            archive.writestr(names[-1], data)
        archive.writestr("dataset.json", json.dumps({"labels": [[n, l] for n, l in zip(names, labels)]
                                                     if labels is not None else None}))
    print(f"{args.zip}: {len(names):,} images" + (f", {len(set(labels))} classes" if labels is not None else ""))


if __name__ == "__main__":
    main()
