"""``python -m jobs.prepare_wallpapers --output DIR``: the default tuner's training images.

Downloads Debian's wallpaper packages (``mate-backgrounds``, ``plasma-workspace-wallpapers``,
``lomiri-wallpapers-16.04``, ``lomiri-wallpapers-20.04``) with ``apt-get download``
(or takes the .deb files in --debs), extracts them with ``dpkg-deb -x``, keeps the photographs, and
writes one WebDataset shard plus ``_provenance.json`` (packages, versions, per-file copyright and
licence from each package's debian/copyright) to --output. Then:
``imagetune train-tuner --input DIR --output MODEL_DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

from pipeline.training.wallpapers import download_packages, extract_package, select_photos, write_shard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare_wallpapers", description=__doc__)
    parser.add_argument("--output", required=True, help="directory for the shard and _provenance.json")
    parser.add_argument("--debs", help="directory holding the .deb files (default: apt-get download them)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        debs = sorted(Path(args.debs).glob("*.deb")) if args.debs else download_packages(Path(scratch) / "debs")
        photos, packages = [], []
        for deb in debs:
            root = Path(scratch) / deb.stem
            package, version = extract_package(deb, root)
            deb_sha256 = hashlib.sha256(deb.read_bytes()).hexdigest()
            packages.append({"name": package, "version": version, "deb_sha256": deb_sha256})
            photos += select_photos(root, package, version)
        shard = write_shard(photos, Path(args.output), packages)
    print(f"{len(photos)} photographs from {', '.join(p['name'] + ' ' + p['version'] for p in packages)} in {shard}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
