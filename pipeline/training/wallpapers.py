"""The default tuner's training data: photographs from Debian's wallpaper packages, with provenance.

Only photographs are taken (rendered and abstract artwork is left out), by an explicit list per
package. The licence of each file is read from the package's own ``debian/copyright`` (DEP-5)
and written beside the shards in ``_provenance.json``, which the training job copies into the
model card. The images themselves are never committed to the repository.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Photographs only, by an explicit list per package; the other wallpapers of these packages are
# renders, drawings or abstract art. Each package's files live under its own folder layout.
PHOTOS = {
    "mate-backgrounds": (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow",
        "LadyBird", "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower",
    ),
    "plasma-workspace-wallpapers": (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
        "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "summer_1am",
    ),
    "lomiri-wallpapers-16.04": (
        "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace",
        "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi",
        "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich",
        "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi",
        "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi",
    ),
    "lomiri-wallpapers-20.04": ("Kleiber_by_Lukas_Baubkus",),
}  # fmt: skip
PACKAGES = tuple(PHOTOS)


@dataclass(frozen=True)
class Photo:
    """One selected photograph: where it is in its package and under which terms."""

    package: str
    version: str
    name: str
    source_path: str
    file: Path
    copyright: str
    license: str

    @property
    def key(self) -> str:
        """The WebDataset key: no dots, since a key ends at its first dot (``lomiri-wallpapers-16.04``)."""
        return f"{self.package}__{self.name}".replace(".", "_")


def download_packages(directory: Path) -> list[Path]:
    """``apt-get download`` the wallpaper packages into ``directory`` (Debian's mirror, as root or not)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=directory, check=True)
    return sorted(directory.glob("*.deb"))


def extract_package(deb: Path, target: Path) -> tuple[str, str]:
    """Unpack ``deb`` under ``target``; returns (package name, version)."""
    fields = {
        name: subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True, text=True).stdout
        for name in ("Package", "Version")
    }
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return fields["Package"].strip(), fields["Version"].strip()


def parse_copyright(text: str) -> list[dict[str, str]]:
    """The ``Files:`` paragraphs of a DEP-5 ``debian/copyright`` as dicts (continuation lines joined)."""
    paragraphs = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        name = ""
        for line in block.splitlines():
            if line[:1].isspace() and name:
                fields[name] += "\n" + line.strip()
            elif ":" in line:
                name, value = line.split(":", 1)
                fields[name] = value.strip()
        if "Files" in fields:
            paragraphs.append(fields)
    return paragraphs


def terms_for(paragraphs: list[dict[str, str]], path: str) -> tuple[str, str]:
    """(Copyright, License) of ``path``: the last matching paragraph wins, as DEP-5 specifies."""
    found = ("", "")
    for paragraph in paragraphs:
        if any(fnmatch.fnmatch(path, pattern) for pattern in paragraph["Files"].split()):
            found = (paragraph.get("Copyright", ""), paragraph.get("License", "").split("\n", 1)[0])
    return found


def select_photos(root: Path, package: str, version: str) -> list[Photo]:
    """The photographs of one extracted package, each with its copyright and licence."""
    copyright_text = (root / "usr/share/doc" / package / "copyright").read_text(encoding="utf-8")
    paragraphs = parse_copyright(copyright_text)
    photos = []
    for name in PHOTOS[package]:
        source, file = _locate(root, package, name)
        photos.append(Photo(package, version, name, source, file, *terms_for(paragraphs, source)))
    return photos


def _locate(root: Path, package: str, name: str) -> tuple[str, Path]:
    """(path as the package's debian/copyright names it, extracted file) of one photograph."""
    if package == "mate-backgrounds":
        return f"nature/{name}.jpg", root / "usr/share/backgrounds/mate/nature" / f"{name}.jpg"
    if package.startswith("lomiri-wallpapers-"):
        release = package.rsplit("-", 1)[1]
        return f"{release}/{name}.jpg", root / "usr/share/backgrounds" / f"{name}.jpg"
    images = root / "usr/share/wallpapers" / name / "contents/images"
    # Most sizes are symbolic links to one file: take the largest distinct file.
    file = max({p.resolve() for p in images.iterdir() if p.is_file()}, key=lambda p: p.stat().st_size)
    return f"{name}/contents/images/{file.name}", file


def write_shard(photos: list[Photo], output: Path, packages: list[dict]) -> Path:
    """One WebDataset tar of the photographs (``<key>.<ext>`` + ``<key>.json``) and ``_provenance.json``."""
    output.mkdir(parents=True, exist_ok=True)
    shard = output / "wallpapers-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for photo in sorted(photos, key=lambda p: p.key):
            data = photo.file.read_bytes()
            meta = {
                "package": photo.package,
                "version": photo.version,
                "path": photo.source_path,
                "copyright": photo.copyright,
                "license": photo.license,
            }
            for name, payload in (
                (f"{photo.key}{photo.file.suffix.lower()}", data),
                (f"{photo.key}.json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))
    provenance = {
        "source": "Debian bookworm wallpaper packages, photographs only",
        "packages": packages,
        "licenses": sorted({photo.license for photo in photos}),
        "images": len(photos),
        "files": [
            {"key": p.key, "package": p.package, "path": p.source_path, "copyright": p.copyright, "license": p.license}
            for p in sorted(photos, key=lambda p: p.key)
        ],
        "shard_sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
    }
    (output / "_provenance.json").write_text(json.dumps(provenance, indent=2, ensure_ascii=False))
    return shard
