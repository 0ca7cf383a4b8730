"""A hostile-input corpus written by code (no binary files in the repository), one builder per source kind.

Each builder writes its inputs under ``base`` and returns what every input must become: an ``Expect`` per
row (source id, ``ok`` or the error row's reason tag, and a substring its notes must hold). Inputs outside
the input root live in ``outside`` (``OUTSIDE_FILES``), each holding ``SECRET`` or a JPEG of its own, so a
test can check that none of their bytes reach the output.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, features

SECRET = b"root:x:0:0:HOSTILE-CORPUS-SECRET-7f3a9c"
MAX_IMAGE_BYTES = 1_000_000  # passed as source.max_image_bytes; `huge.jpg` is over it


@dataclass(frozen=True)
class Expect:
    source_id: str
    status: str  # "ok" or the reason tag of the error row (`outside_root`, `duplicate_key` …)
    note: str | None = None  # a substring of the row's notes (ok rows)


def jpeg(color=(200, 30, 30), size=(32, 24), orientation: int = 1, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(sum(color) + size[0])
    pixels = np.clip(rng.normal(color, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def png(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (IHDR patched, CRC fixed)."""
    data = bytearray(png(Image.new("L", (4, 4))))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def odd_images() -> dict[str, bytes]:
    """Images that are valid but awkward: all must convert to RGB and be stored."""
    palette = Image.new("P", (24, 24), 1)
    palette.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)
    gif_frames = [Image.new("P", (24, 24), i) for i in range(3)]
    gif = io.BytesIO()
    gif_frames[0].save(gif, format="GIF", save_all=True, append_images=gif_frames[1:], duration=50)
    return {
        "cmyk.jpg": jpeg(mode="CMYK"),
        "deep16.png": png(Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16))),
        "palette_alpha.png": png(palette, transparency=0),
        "exif_rotated.jpg": jpeg(orientation=6),
        "animated.gif": gif.getvalue(),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, reason tag) for files that are not usable images."""
    whole = jpeg(size=(64, 48))
    return {
        "zero.jpg": (b"", "empty"),
        "truncated.jpg": (whole[: len(whole) // 2], "truncated"),
        "text.jpg": (b"just some text, not an image\n", "not_an_image"),
        "bomb.png": (bomb_png(), "too_large"),
    }


def write_outside(outside: Path) -> dict[str, bytes]:
    """Files outside every input root that hostile inputs point at; returns name -> bytes."""
    outside.mkdir(parents=True)
    files = {"passwd": SECRET, "theirs.jpg": jpeg(color=(1, 2, 3), size=(40, 40))}
    for name, data in files.items():
        (outside / name).write_bytes(data)
    _write_tar(outside / "theirs.tar", [("x.jpg", files["theirs.jpg"]), ("x.txt", SECRET)])
    files["theirs.tar"] = (outside / "theirs.tar").read_bytes()
    return files


def folder_corpus(root: Path, outside: Path) -> list[Expect]:
    (root / "sub").mkdir(parents=True)
    expect = []
    for name, data in {"ok.jpg": jpeg(), "My Photo (1).JPG": jpeg((9, 90, 9)), "日本.jpg": jpeg((90, 9, 9)),
                       "..%2f..%2fevil.jpg": jpeg((0, 0, 200)), "sub/nested.png": png(Image.new("RGB", (20, 30))),
                       "same.jpg": jpeg((5, 5, 5)), **odd_images()}.items():
        (root / name).write_bytes(data)
        expect.append(Expect(name, "ok"))
    for name, (data, tag) in bad_images().items():
        (root / name).write_bytes(data)
        expect.append(Expect(name, tag))
    (root / "same.png").write_bytes(png(Image.new("RGB", (20, 20))))  # the same key as same.jpg
    (root / "._ok.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00" + bytes(64))  # macOS AppleDouble fork
    (root / "huge.jpg").write_bytes(jpeg() + bytes(MAX_IMAGE_BYTES))
    for name, data, caption in (("cat.jpg", jpeg((30, 30, 30)), None), ("latin.jpg", jpeg((60, 60, 60)), b"caf\xe9"),
                                ("bigcap.jpg", jpeg((90, 90, 90)), b"x" * (2**20 + 1))):
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_bytes(caption)
    (root / "cat.txt").symlink_to(outside / "passwd")
    (root / "alias.jpg").symlink_to(root / "ok.jpg")
    (root / "stolen.jpg").symlink_to(outside / "theirs.jpg")
    (root / "devzero.jpg").symlink_to("/dev/zero")
    (root / "linkdir.jpg").symlink_to(outside)
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    os.mkfifo(root / "fifo.jpg")
    (root / ".git").mkdir()
    (root / ".git" / "not_an_input.jpg").write_bytes(jpeg())  # hidden folders are not walked
    expect += folder_round2(root)
    return expect + [
        Expect("same.png", "duplicate_key"), Expect("._ok.jpg", "not_an_image"), Expect("huge.jpg", "too_large"),
        Expect("cat.jpg", "ok", "sidecar_skipped: outside_root"), Expect("latin.jpg", "ok", "not_utf8"),
        Expect("bigcap.jpg", "ok", "sidecar_skipped: too_large"), Expect("alias.jpg", "ok"),
        Expect("stolen.jpg", "outside_root"), Expect("devzero.jpg", "outside_root"),
        Expect("linkdir.jpg", "outside_root"), Expect("dangling.jpg", "missing_image"),
        Expect("loop.jpg", "unreadable"), Expect("fifo.jpg", "not_a_regular_file"),
    ]


def folder_round2(root: Path) -> list[Expect]:
    """Issue 20 (second round) folder cases: names the tar header or UTF-8 cannot hold (class 1), formats and
    names the listing missed (class 3)."""
    expect = []
    long_names = {"L" * 240 + ".jpg": jpeg((11, 22, 33)),  # key over ustar's 100-character member name
                  "1" + "s" * 230 + ".jpg": jpeg((12, 22, 33)),  # two keys over 200 characters that share
                  "2" + "s" * 230 + ".jpg": jpeg((13, 22, 33)),  # their last 200: distinct after shortening
                  "d" * 120 + "/" + "e" * 120 + ".png": png(Image.new("RGB", (12, 10), (1, 2, 3)))}
    for name, data in long_names.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
        expect.append(Expect(name, "ok"))
    (root / os.fsdecode(b"caf\xe9_latin1.jpg")).write_bytes(jpeg((14, 22, 33)))  # not valid UTF-8
    expect.append(Expect("caf\\xe9_latin1.jpg", "ok", "not_utf8"))
    rgb = Image.fromarray(np.full((18, 26, 3), (40, 160, 90), np.uint8))
    formats = {".jpg": jpeg((15, 22, 33)), "photo.jfif": jpeg((16, 22, 33)), "photo2.JPE": jpeg((17, 22, 33)),
               "tga.tga": _encoded(rgb, "TGA"), "qoi.qoi": _encoded(rgb, "QOI"), "pcx.pcx": _encoded(rgb, "PCX")}
    if features.check("avif"):
        formats["avif.avif"] = _encoded(rgb, "AVIF")
    for name, data in formats.items():
        (root / name).write_bytes(data)
        expect.append(Expect(name, "ok"))
    # class 2: shapes a model stage cannot take are stored with a note, never error rows
    for name, size in {"strip.png": (16000, 1), "column.png": (1, 9000), "thin.png": (1000, 4),
                       "big.png": (4200, 4200)}.items():  # big: over images.max_model_pixels (4096²)
        (root / name).write_bytes(png(Image.new("RGB", size, (90, 120, 150))))
        expect.append(Expect(name, "ok", "models_skipped"))
    for name, size in {"pixel.png": (1, 1), "tiny.png": (2, 3)}.items():
        (root / name).write_bytes(png(Image.new("RGB", size, (90, 120, 150))))
        expect.append(Expect(name, "ok"))
    # class 4: a hard link may be another name of a file outside the root: refused, like a link out
    os.link(root.parent / "outside" / "theirs.jpg", root / "hardlinked.jpg")
    expect.append(Expect("hardlinked.jpg", "hard_link"))
    return expect


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes | tuple[bytes, str]]]) -> None:
    """Members are ``(name, data)`` or ``(name, (type, linkname))`` for links."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def tar_corpus(root: Path, outside: Path) -> list[Expect]:
    root.mkdir(parents=True)
    bad = bad_images()
    _write_tar(root / "00000.tar", [
        ("000.jpg", jpeg()), ("000.txt", b"a red picture"),
        ("001.jpg", bad["zero.jpg"][0]), ("002.jpg", bad["text.jpg"][0]), ("trunc.jpg", bad["truncated.jpg"][0]),
        ("bomb.png", bad["bomb.png"][0]), ("cmyk.jpg", odd_images()["cmyk.jpg"]),
        ("../evil.jpg", jpeg((0, 90, 0))),
        ("dup.jpg", jpeg((10, 10, 10))), ("dup.txt", b"first"), ("dup.jpg", jpeg((99, 99, 99))),
        ("link.jpg", (tarfile.SYMTYPE, "/etc/passwd")), ("hard.jpg", (tarfile.LNKTYPE, "000.jpg")),
        (".hidden.jpg", jpeg()), ("noimg.txt", b"a caption without its image"),
    ])
    _write_tar(root / "00001.tar", [("100.jpg", jpeg((50, 0, 50))), ("101.jpg", jpeg((0, 50, 50)))])
    whole = (root / "00001.tar").read_bytes()
    with tarfile.open(root / "00001.tar") as tar:
        cut = tar.getmembers()[1].offset + 100  # inside the second member's header
    (root / "00001.tar").write_bytes(whole[:cut])
    (root / "00002.tar").write_bytes(b"not a tar archive, just text " * 30)
    (root / "00003.tar").symlink_to(outside / "theirs.tar")
    os.mkfifo(root / "00004.tar")
    pq.write_table(pa.table({"key": ["p1", "p1", "p2"], "jpg": pa.array([jpeg((1, 99, 1)), jpeg(), None]),
                             "status": ["success", "success", "failed_to_download"]}), root / "00005.parquet")
    return tar_round2(root) + [
        Expect("00000.tar/000", "ok"), Expect("00000.tar/001", "empty"), Expect("00000.tar/002", "not_an_image"),
        Expect("00000.tar/trunc", "truncated"), Expect("00000.tar/bomb", "too_large"), Expect("00000.tar/cmyk", "ok"),
        Expect("00000.tar/../evil", "ok"), Expect("00000.tar/dup", "ok"), Expect("00000.tar#dup2/dup", "duplicate_key"),
        Expect("00000.tar/link", "not_a_regular_file"), Expect("00000.tar/hard", "not_a_regular_file"),
        Expect("00000.tar#hidden/.hidden.jpg", "hidden_member"), Expect("00000.tar/noimg", "missing_image"),
        Expect("00001.tar/100", "ok"), Expect("00001.tar/", "unreadable"), Expect("00002.tar/", "unreadable"),
        Expect("00003.tar/", "outside_root"), Expect("00004.tar/", "not_a_regular_file"),
        Expect("00005.parquet/p1", "ok"), Expect("00005.parquet#dup2/p1", "duplicate_key"),
        Expect("00005.parquet/p2", "missing_image"),
    ]


def tar_round2(root: Path) -> list[Expect]:
    """Issue 20 img2dataset cases: parquet columns of the wrong type (class 1 / 2), compressed tars (class 3),
    member names the tar header or UTF-8 cannot hold (class 1), another image extension (class 3)."""
    pq.write_table(pa.table({"key": pa.array([7, 0], pa.int64()), "jpg": [jpeg((2, 98, 1)), jpeg((3, 98, 1))]}),
                   root / "00006.parquet")
    pq.write_table(pa.table({"key": ["i"], "jpg": pa.array([123], pa.int64())}), root / "00007.parquet")
    pq.write_table(pa.table({"key": ["s"], "jpg": ["not bytes"]}), root / "00008.parquet")
    _write_tar(root / "00009.tar.gz", [("900.jpg", jpeg((4, 98, 1))), ("900.txt", b"gzipped sample")])
    (root / "00009.tar.gz").write_bytes(gzip.compress((root / "00009.tar.gz").read_bytes(), mtime=0))
    long_key = "k" * 250
    gif = io.BytesIO()
    Image.new("RGB", (16, 12), (5, 98, 1)).save(gif, format="GIF")
    _write_tar(root / "00010.tar", [(f"{long_key}.jpg", jpeg((6, 98, 1))), (f"{long_key}.txt", b"long"),
                                    (os.fsdecode(b"caf\xe9.jpg"), jpeg((7, 98, 1))), ("anim.gif", gif.getvalue())])
    return [
        Expect("00006.parquet/7", "ok"), Expect("00006.parquet/0", "ok"), Expect("00007.parquet/i", "bad_column"),
        Expect("00008.parquet/s", "bad_column"), Expect("00009.tar.gz/900", "ok"),
        Expect(f"00010.tar/{long_key}", "ok"), Expect("00010.tar/caf\\xe9", "ok", "not_utf8"),
        Expect("00010.tar/anim", "ok"),
    ]


def coco_corpus(root: Path, outside: Path) -> list[Expect]:
    images_dir = root / "images" / "train"
    images_dir.mkdir(parents=True)
    h, w = 24, 32
    square = [4.0, 4.0, 20.0, 4.0, 20.0, 16.0, 4.0, 16.0]
    runs = [0, h * w]  # an all-background uncompressed RLE
    images, anns, expect = [], [], []

    def image(file_name, status, note=None, data=None, annotations=(), **entry):
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w, **entry})
        for ann in annotations:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "bbox": [2, 2, 10, 10], **ann})
        if data is not None:
            (images_dir / file_name).write_bytes(data)
        expect.append(Expect(file_name, status, note))

    image("ok.jpg", "ok", data=jpeg(size=(w, h)), annotations=[{"segmentation": [square]},
                                                               {"segmentation": {"size": [h, w], "counts": runs}}])
    for name, bad in (("nan_poly.jpg", float("nan")), ("big_poly.jpg", 1e12), ("neg_poly.jpg", -1e9)):
        image(name, "ok", "mask dropped: polygon 0", jpeg(size=(w, h)),
              [{"segmentation": [[*square[:-1], bad]]}])
    image("bg_nan.jpg", "ok", "skipped background 0: polygon 0", jpeg(size=(w, h)),
          umg={"background": [{"label": "sky", "segmentation": [[*square[:-1], float("nan")]]}]})
    image("boxes.jpg", "ok", "is not finite", jpeg(size=(w, h)), [
        {"bbox": [5, 5, -3, 4]}, {"bbox": [float("nan"), 1, 2, 2]}, {"bbox": [1, 1, float("inf"), 2]},
        {"bbox": [1000, 1000, 5, 5]}, {"bbox": [-5, -5, 12, 12]}])
    image("rle_size.jpg", "ok", "RLE size [60, 80] != image", jpeg(size=(w, h)),
          [{"segmentation": {"size": [60, 80], "counts": [0, 4800]}}])
    image("rle_over.jpg", "ok", "RLE runs cover", jpeg(size=(w, h)),
          [{"segmentation": {"size": [h, w], "counts": [0, h * w * 1000]}}])
    image("two_point.jpg", "ok", "polygon 0 has 4 values", jpeg(size=(w, h)), [{"segmentation": [[1, 1, 9, 9]]}])
    image("nocat.jpg", "ok", "unknown category_id 77", jpeg(size=(w, h)), [{"category_id": 77}])
    image("hugeclaim.jpg", "ok", "image height/width not usable", jpeg(size=(w, h)),
          [{"segmentation": [square]}], height=10**6, width=10**6)
    image("exif.jpg", "ok", None, jpeg(size=(w, h), orientation=6), [{"segmentation": [square]}])
    # issue 20 class 2: one malformed annotation / caption / tag never discards the image's valid ones
    image("mixed_anns.jpg", "ok", "skipped annotation 0: malformed", jpeg(size=(w, h)),
          [{"category_id": [1]}, {"segmentation": [square]}])
    image("mixed_caps.jpg", "ok", "skipped caption 1", jpeg(size=(w, h)),
          umg={"captions": ["a fine caption", "bad \ud800 surrogate", "another"],
               "tags": ["thing", {"no_name": 1}, {"name": "other", "score": 0.5}]})
    image("mixed_tags.jpg", "ok", "skipped tag 1", jpeg(size=(w, h)), umg={"tags": ["thing", {"no_name": 1}]})
    image("missing.jpg", "missing_image")
    image("zero.jpg", "empty", data=b"")
    image("text.jpg", "not_an_image", data=b"plain text")
    image("../../../outside/theirs.jpg", "outside_root")
    image(str(outside / "theirs.jpg"), "outside_root")
    image("/etc/passwd", "outside_root")
    image("link_out.jpg", "outside_root")
    (images_dir / "link_out.jpg").symlink_to(outside / "theirs.jpg")
    images.append({"id": 1, "file_name": "dup.jpg", "height": h, "width": w})
    expect.append(Expect("000000000001#2", "duplicate_id"))
    images.append({"id": 18000})  # no file_name
    expect.append(Expect("000000018000", "bad_annotation"))
    images.append("junk")
    expect.append(Expect(f"!images/{len(images) - 1}", "bad_annotation"))
    anns.append({"id": 900, "image_id": 999, "category_id": 1, "bbox": [1, 1, 2, 2]})
    expect.append(Expect("000000000999", "orphan_annotations"))
    anns.append(["not", "an", "object"])
    expect.append(Expect(f"!annotations/{len(anns) - 1}", "bad_annotation"))
    document = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations").mkdir()
    # json.dumps writes NaN/Infinity, as Python-made COCO files in the wild do; the reader accepts them.
    (root / "annotations" / "instances_train.json").write_text(json.dumps(document), encoding="utf-8")
    # issue 20 class 4: a second split whose image folder is a link out of the root
    (root / "images" / "val").symlink_to(outside, target_is_directory=True)
    val = {"images": [{"id": 1, "file_name": "theirs.jpg", "height": 40, "width": 40}], "annotations": [],
           "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(val), encoding="utf-8")
    return expect + [Expect("theirs.jpg", "outside_root")]


def vg_corpus(root: Path, outside: Path) -> list[Expect]:
    root.mkdir(parents=True)
    (root / "1.jpg").write_bytes(jpeg())
    (root / "5.jpg").write_bytes(jpeg((20, 40, 60)))
    regions = [{"region_id": 1, "phrase": "a red thing", "x": 2, "y": 2, "width": 10, "height": 10},
               {"region_id": 2, "phrase": "nowhere", "x": "NaN", "y": 2, "width": 10, "height": 10}]
    document = [{"id": 1, "regions": regions}, {"id": f"../{outside.name}/theirs", "regions": []},
                {"regions": []}, {"id": 4, "regions": []},
                # issue 20 class 2: one malformed region never discards the image's valid ones
                {"id": 5, "regions": ["not a region", {"region_id": 9, "phrase": "ok", "x": 1, "y": 1, "width": 4,
                                                       "height": 4}]},
                {"id": 6, "regions": "not a list"}]
    # strict JSON ("NaN" as a string, not the bare literal): the file is streamed (issue 20 class 8)
    (root / "region_descriptions.json").write_text(json.dumps(document, allow_nan=False), encoding="utf-8")
    return [Expect("1.jpg", "ok", "is not finite"), Expect(f"../{outside.name}/theirs.jpg", "outside_root"),
            Expect("!entries/2", "bad_annotation"), Expect("4.jpg", "missing_image"),
            Expect("5.jpg", "ok", "skipped region 0"), Expect("!entries/5", "bad_annotation")]


@dataclass(frozen=True)
class Fault:
    """A run-level fault (issue 20 class 5): ``umg`` arguments that must end in one ``error:`` line naming
    ``reason``, a non-zero exit and no traceback."""

    name: str
    args: list[str]
    reason: str


def run_faults(base: Path, outside: Path, smoke: Path) -> list[Fault]:
    """Inputs, configs and overrides a build must refuse up front; files under ``base``."""
    base.mkdir(parents=True)
    good = base / "images"
    good.mkdir()
    (good / "a.jpg").write_bytes(jpeg())
    os.mkfifo(base / "fifo_in")
    os.mkfifo(base / "fifo.yaml")
    coco_out = base / "coco_linked"  # a COCO root whose instances file is a link to a JSON outside the root
    (coco_out / "annotations").mkdir(parents=True)
    (coco_out / "images" / "train").mkdir(parents=True)
    (outside / "instances_secret.json").write_text(json.dumps({"images": [], "info": SECRET.decode()}))
    (coco_out / "annotations" / "instances_train.json").symlink_to(outside / "instances_secret.json")
    vg_out = base / "vg_linked"
    vg_out.mkdir()
    (outside / "regions_secret.json").write_text(json.dumps([{"id": 1, "regions": [], "x": SECRET.decode()}]))
    (vg_out / "region_descriptions.json").symlink_to(outside / "regions_secret.json")
    coco_big = base / "coco_big"
    (coco_big / "annotations").mkdir(parents=True)
    (coco_big / "images" / "train").mkdir(parents=True)
    (coco_big / "annotations" / "instances_train.json").write_text(json.dumps({"images": [], "pad": "x" * 4096}))

    def build(inp: str | Path, *extra: str, config: str | Path = smoke) -> list[str]:
        return ["build", "--config", str(config), "--input", str(inp), "--set", "annotate=null", *extra]

    return [
        Fault("empty --input", build(""), "--input is empty"),
        Fault("blank source.path", build(good, "--set", "source.path=' '"), "is empty"),
        Fault("FIFO as --input", build(base / "fifo_in"), "is a FIFO"),
        Fault("/dev/null as --input", build("/dev/null"), "is a character device"),
        Fault("--config a directory", build(good, config=base), "is a directory"),
        Fault("--config a FIFO", build(good, config=base / "fifo.yaml"), "not a regular file"),
        Fault("--set without =", build(good, "--set", "shard_size"), "not of the form"),
        Fault("--set with an empty key", build(good, "--set", "=3"), "empty part"),
        Fault("--set source..path", build(good, "--set", "source..path=x"), "empty part"),
        Fault("--set unclosed YAML", build(good, "--set", "shard_size=[1,"), "not valid YAML"),
        Fault("--set a value of the wrong type", build(good, "--set", "shard_size=many"), "shard_size"),
        Fault("COCO instances linked out of the root", build(coco_out), "outside_root"),
        Fault("VG JSON linked out of the root", build(vg_out), "outside_root"),
        Fault("annotation file over the cap", build(coco_big, "--set", "source.max_annotation_bytes=1024"),
              "source.max_annotation_bytes=1024"),
    ]
