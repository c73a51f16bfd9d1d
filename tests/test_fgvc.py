"""`san-prepare fgvc` on tiny official-format releases, and FGVC folder verification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from san.cli.prepare import main as prepare
from san.data import fgvc_folder
from san.data.fgvc_folder import build_fgvc, carve_val, verify_fgvc_folder
from san.data.fgvc_sources import SPECS, SourceError, read_source, spec_for
from san.data.splits import read_split
from san.records import read_record
from san.run import DatasetVerificationError, run
from san.testing.fgvc_releases import make_release, pack_release

NAMES = sorted(SPECS)


def _tables(folder: Path) -> dict[str, dict[str, int]]:
    return {split: json.loads((folder / f"{split}.json").read_text()) for split in ("train", "val", "test")}


def test_documented_sizes_follow_from_the_release_and_match_the_configs(compose):
    vpt = {
        "cub": (5394, 600, 5794),
        "nabirds": (21536, 2393, 24633),
        "oxford_flowers": (1020, 1020, 6149),
        "stanford_dogs": (10800, 1200, 8580),
        "stanford_cars": (7329, 815, 8041),
    }  # VPT's published sizes
    for name, (train, val, test) in vpt.items():
        spec = SPECS[name]
        assert spec.counts == {"train": train, "val": val, "test": test}, name
        dataset = compose([f"dataset={name}"]).dataset
        assert dict(dataset.expected_counts) == spec.counts
        assert (dataset.num_classes, dataset.image_root, dataset.folder) == (spec.num_classes, spec.image_root, name)
        assert spec_for(spec.short) is spec
    with pytest.raises(KeyError, match="accepted: .*cars.*cub"):
        spec_for("birds")


def test_carve_is_seeded_and_keeps_the_release_order():
    train = [(f"k{i}", i % 3) for i in range(50)]
    kept, val = carve_val(train, 5, seed=0)
    assert len(val) == 5 and len(kept) == 45 and sorted(kept + val) == sorted(train)
    assert kept == sorted(kept, key=train.index) and val == sorted(val, key=train.index)
    assert carve_val(train, 5, seed=0) == (kept, val)
    assert carve_val(train, 5, seed=1)[1] != val


@pytest.mark.parametrize("name", NAMES)
def test_build_from_the_release_folder_and_from_its_archives(tmp_path, name):
    extracted, spec = make_release(name, tmp_path / "release")
    official = read_source([extracted], spec).splits
    folder = build_fgvc(spec, extracted, tmp_path / "fgvc" / name, progress=False)

    report = verify_fgvc_folder(folder, spec.num_classes, spec.counts, spec.image_root, decode=True)
    assert report.ok, report.problems
    tables = _tables(folder)
    assert {split: len(table) for split, table in tables.items()} == spec.counts
    official_fit = dict(official["train"] + official.get("val", []))
    assert {**tables["train"], **tables["val"]} == official_fit  # val comes out of the official train (+val)
    assert tables["test"] == dict(official["test"])  # the official test split, untouched, official labels
    assert list(tables["test"]) == [key for key, _ in official["test"]]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["counts"] == spec.counts and manifest["num_classes"] == spec.num_classes
    assert not list((tmp_path / "fgvc").glob(".*"))  # no staging or unpacked release left behind
    assert (
        len(
            read_split(
                {
                    "name": name,
                    "format": "fgvc_json",
                    "root": str(tmp_path / "fgvc"),
                    "folder": name,
                    "image_root": spec.image_root,
                    "split_files": ["train", "val", "test"],
                    "num_classes": spec.num_classes,
                    "splits": {"trainval": ["train", "val"]},
                },
                "trainval",
            )
        )
        == spec.counts["train"] + spec.counts["val"]
    )

    downloads = pack_release(name, extracted, tmp_path / "downloads")
    shutil.rmtree(tmp_path / "release")  # only the archives remain
    from_archives = build_fgvc(spec, downloads, tmp_path / "from_archives" / name, progress=False)
    for split in ("train.json", "val.json", "test.json"):
        assert (from_archives / split).read_bytes() == (folder / split).read_bytes()
    assert json.loads((from_archives / "manifest.json").read_text())["images_sha256"] == manifest["images_sha256"]


def test_seed_changes_val_membership_not_sizes(tmp_path):
    extracted, spec = make_release("cub", tmp_path / "release")
    first = _tables(build_fgvc(spec, extracted, tmp_path / "a" / "cub", progress=False))
    again = _tables(build_fgvc(spec, extracted, tmp_path / "b" / "cub", progress=False))
    other = _tables(build_fgvc(spec, extracted, tmp_path / "c" / "cub", seed=1, progress=False))
    assert first == again
    assert len(other["val"]) == len(first["val"]) and other["val"] != first["val"]
    assert json.loads((tmp_path / "c" / "cub" / "manifest.json").read_text())["source"]["seed"] == 1


def test_symlinked_images_and_a_complete_folder_is_kept(tmp_path, capsys):
    extracted, spec = make_release("stanford_dogs", tmp_path / "release")
    folder = build_fgvc(spec, extracted, tmp_path / "fgvc" / "stanford_dogs", images="symlink", progress=False)
    assert (folder / "Images").is_symlink()
    assert verify_fgvc_folder(folder, spec.num_classes, spec.counts, "Images").ok
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert build_fgvc(spec, extracted, folder, progress=False) == folder
    assert "already prepared" in capsys.readouterr().out and (folder / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="accepted: \\['copy', 'symlink'\\]"):
        build_fgvc(spec, extracted, tmp_path / "x", images="hardlink")


def test_given_vpt_splits_are_checked_against_the_release_then_used(tmp_path):
    extracted, spec = make_release("cub", tmp_path / "release")
    carved = _tables(build_fgvc(spec, extracted, tmp_path / "carved" / "cub", seed=3, progress=False))
    given = tmp_path / "vpt_splits"
    given.mkdir()
    for split, table in carved.items():  # VPT-style files with their own (0-based) class ids
        (given / f"{split}.json").write_text(json.dumps({key: label - 1 for key, label in table.items()}))
    folder = build_fgvc(spec, extracted, tmp_path / "fgvc" / "cub", splits_dir=given, progress=False)
    for split in ("train", "val", "test"):
        assert (folder / f"{split}.json").read_bytes() == (given / f"{split}.json").read_bytes()
    assert json.loads((folder / "manifest.json").read_text())["source"]["splits"] == "given"

    bad = {split: json.loads((given / f"{split}.json").read_text()) for split in ("train", "val", "test")}
    moved = next(iter(bad["test"]))
    bad["train"][moved] = bad["test"].pop(moved)  # a test image in train
    for split, table in bad.items():
        (given / f"{split}.json").write_text(json.dumps(table))
    with pytest.raises(SourceError) as caught:
        build_fgvc(spec, extracted, tmp_path / "fgvc2" / "cub", splits_dir=given, progress=False)
    message = str(caught.value)
    assert "train.json + val.json: 1 images the official split does not hold" in message
    assert "test.json: 1 images of the official split missing" in message
    assert "test.json: 7 entries, VPT's split has 8" in message
    assert not (tmp_path / "fgvc2" / "cub").exists()


def test_given_splits_with_mislabelled_images_are_refused(tmp_path):
    extracted, spec = make_release("cub", tmp_path / "release")
    carved = _tables(build_fgvc(spec, extracted, tmp_path / "carved" / "cub", progress=False))
    keys = [key for key, label in carved["train"].items() if label in (1, 2)]
    a = next(key for key in keys if carved["train"][key] == 1)
    carved["train"][a] = 2  # one class-1 image labelled as class 2
    given = tmp_path / "vpt_splits"
    given.mkdir()
    for split, table in carved.items():
        (given / f"{split}.json").write_text(json.dumps(table))
    with pytest.raises(SourceError, match="labels disagree with the release"):
        build_fgvc(spec, extracted, tmp_path / "fgvc" / "cub", splits_dir=given, progress=False)


def test_the_wrong_release_and_missing_files_are_named(tmp_path):
    extracted, spec = make_release("cub", tmp_path / "release")
    with pytest.raises(SourceError, match="labels hold 4 classes, cub has 200; is --src the right dataset"):
        build_fgvc("cub", extracted, tmp_path / "fgvc" / "cub", progress=False)  # the real spec: 200 classes
    (extracted / "train_test_split.txt").unlink()
    with pytest.raises(SourceError, match="train_test_split.txt not found .*CUB_200_2011.tgz"):
        build_fgvc(spec, extracted, tmp_path / "fgvc" / "cub", progress=False)
    with pytest.raises(SourceError, match="does not exist"):
        build_fgvc(spec, tmp_path / "nowhere", tmp_path / "fgvc" / "cub", progress=False)

    cars, cars_spec = make_release("stanford_cars", tmp_path / "cars")
    (cars / "cars_test_annos_withlabels.mat").unlink()  # only the devkit's unlabelled test annotations remain
    with pytest.raises(SourceError, match="cars_test_annos_withlabels.mat not found"):
        build_fgvc(cars_spec, cars, tmp_path / "fgvc" / "stanford_cars", progress=False)
    (cars / "devkit" / "cars_test_annos.mat").rename(cars / "cars_test_annos_withlabels.mat")
    with pytest.raises(SourceError, match="has no class/fname fields"):
        build_fgvc(cars_spec, cars, tmp_path / "fgvc" / "stanford_cars", progress=False)

    flowers, flowers_spec = make_release("oxford_flowers", tmp_path / "flowers")
    (flowers / "jpg" / "image_00002.jpg").unlink()
    with pytest.raises(SourceError, match="image_00002.jpg"):
        build_fgvc(flowers_spec, flowers, tmp_path / "fgvc" / "oxford_flowers", progress=False)
    assert not (tmp_path / "fgvc" / "oxford_flowers").exists()


def test_a_damaged_archive_says_download_again(tmp_path):
    extracted, spec = make_release("cub", tmp_path / "release")
    archive = pack_release("cub", extracted, tmp_path / "downloads")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(SourceError, match="CUB_200_2011.tgz: cannot extract .*download it again"):
        build_fgvc(spec, archive, tmp_path / "fgvc" / "cub", progress=False)
    assert not list((tmp_path / "fgvc").iterdir())


def test_an_interrupted_build_leaves_no_folder_and_the_next_one_starts_clean(tmp_path, monkeypatch):
    extracted, spec = make_release("cub", tmp_path / "release")
    out = tmp_path / "fgvc" / "cub"
    real_place = fgvc_folder._place_images

    def place_then_die(*args, **kwargs):
        real_place(*args, **kwargs)
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the images were being hashed

    monkeypatch.setattr(fgvc_folder, "_place_images", place_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_fgvc(spec, extracted, out, progress=False)
    assert not out.exists() and not list(out.parent.glob(".*"))
    monkeypatch.undo()
    (out.parent / ".cub.partial" / "images").mkdir(parents=True)  # what a SIGKILL would leave
    (out.parent / ".cub.partial" / "train.json").write_text("{}")
    assert verify_fgvc_folder(build_fgvc(spec, extracted, out, progress=False), spec.num_classes, spec.counts).ok
    assert not list(out.parent.glob(".*"))


@pytest.fixture
def built(tmp_path) -> tuple[Path, object]:
    extracted, spec = make_release("cub", tmp_path / "release")
    return build_fgvc(spec, extracted, tmp_path / "fgvc" / "cub", progress=False), spec


def _problems(folder: Path, spec, decode: bool = False) -> str:
    return "\n".join(verify_fgvc_folder(folder, spec.num_classes, spec.counts, spec.image_root, decode).problems)


def test_verification_names_each_bad_input(built):
    folder, spec = built
    tables = _tables(folder)
    assert _problems(folder, spec) == ""

    test_keys = list(tables["test"])
    (folder / "images" / test_keys[2]).write_bytes((folder / "images" / test_keys[2]).read_bytes()[:60])
    assert f"{folder / 'test.json'}:entry 3: cannot decode image" in _problems(folder, spec, decode=True)

    (folder / "images" / test_keys[4]).unlink()
    assert f"test.json:entry 5: image '{folder / 'images' / test_keys[4]}' does not exist" in _problems(folder, spec)

    tables["test"][test_keys[0]] = 999  # a class that no other split has
    tables["test"][next(iter(tables["train"]))] = 1  # a training image in test
    (folder / "test.json").write_text(json.dumps(tables["test"]))
    problems = _problems(folder, spec)
    assert "the split files hold 5 distinct classes, expected 4" in problems
    assert "no training image of class id 999" in problems
    assert "test.json: 1 images also in train.json" in problems
    assert "test.json: 9 entries, VPT's split has 8" in problems
    assert "test.json: 9 entries, manifest says 8" in problems
    assert "test.json: sha256 differs from" in problems


def test_malformed_split_files_are_named(built):
    folder, spec = built
    (folder / "val.json").write_text('{"a.jpg": 1, "b.jpg": 1, "c.jpg": "3"}')
    (folder / "test.json").write_text('[["a.jpg", 1]]')
    (folder / "train.json").write_text('{"a.jpg": 1,')
    problems = _problems(folder, spec)
    assert "val.json:entry 3: class id of 'c.jpg' is '3', not an integer" in problems
    assert "test.json: expected a json object mapping image paths to class ids, got a list" in problems
    assert "train.json: not valid json" in problems
    (folder / "val.json").unlink()
    assert "val.json: missing split file" in _problems(folder, spec)


def test_verify_cli_checks_fgvc_folders_by_name_or_manifest(built, capsys):
    folder, spec = built
    root = folder.parent
    folder.rename(root / "CUB_200_2011")  # another repository's folder name for CUB
    with pytest.raises(SystemExit, match="1 dataset folder"):
        prepare(["verify", str(root)])
    out = capsys.readouterr().out
    # a tiny release: its sizes and class count are not CUB's; its files are all there
    assert "FAIL CUB_200_2011 (= cub)" in out and "VPT's split has 5,394" in out
    assert "hold 4 distinct classes, expected 200" in out and "does not exist" not in out
    (root / "CUB_200_2011").rename(root / "my_birds")  # unknown name: checked against its manifest
    prepare(["verify", str(root)])
    assert "OK   my_birds" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="san-prepare fgvc: .*source .*does not exist"):
        prepare(["fgvc", "--dataset", "cub", "--src", str(root / "nowhere"), "--out", str(root / "cub")])


@pytest.mark.slow
def test_a_built_release_trains_and_a_failing_folder_is_refused(built, tmp_path, compose):
    folder, spec = built
    counts = spec.counts
    base = [
        "backbone=test_vit",
        "method=linear",
        "dataset=cub",
        f"paths.root_dir={tmp_path}",
        f"dataset.root={folder.parent}",
        f"dataset.num_classes={spec.num_classes}",
        "debug=fdr",
        "trainer.num_workers=0",
        "trainer.progress=false",
    ]
    sized = [f"dataset.expected_counts={{train: {counts['train']}, val: {counts['val']}, test: {counts['test']}}}"]
    record = read_record(run(compose(base + sized)))
    assert record["status"] == "complete"
    assert record["dataset_check"]["checked"] and record["dataset_check"]["ok"]
    with pytest.raises(DatasetVerificationError, match="(?s)VPT.s split has 5,394.*dataset.verify=false"):
        run(compose(base + ["protocol.stage=final"]))  # CUB's real sizes: this tiny folder is not CUB
    assert read_record(run(compose(base + ["protocol.stage=final", "dataset.verify=false"])))["status"] == "complete"
