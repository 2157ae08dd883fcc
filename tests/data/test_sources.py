"""Image sources: every reader, every bad-input message, the folder/manifest/phantom loaders."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless, generate_uid

from lung_cls.data.sources import (
    CLASS_NAMES,
    DataError,
    Study,
    label_aliases,
    load_studies,
    read_image,
    source_fingerprint,
)

NM_SOP = "1.2.840.10008.5.1.4.1.1.20"  # Nuclear Medicine Image Storage


def blob(size: int = 48, seed: int = 0, scale: float = 1000.0) -> np.ndarray:
    """A small non-constant 'scan': a Gaussian blob with Poisson noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    img = scale * np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2 * (size / 5) ** 2))
    return np.random.default_rng(seed).poisson(img + 2).astype(np.uint16)


def write_dicom(
    path: Path, pixels: np.ndarray, *, transfer=ExplicitVRLittleEndian, **attrs
) -> Dataset:
    """A minimal NM DICOM (uint16 grey, or uint8 RGB when pixels has a trailing 3)."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = attrs.pop("SOPClassUID", NM_SOP)
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = transfer
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = fm.MediaStorageSOPClassUID
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.Modality = "NM"
    ds.PatientID = "PAT1"
    rgb = pixels.ndim >= 3 and pixels.shape[-1] == 3
    frames = pixels.shape[0] if pixels.ndim == (4 if rgb else 3) else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    if rgb:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        data = pixels.astype(np.uint8)
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        data = pixels.astype(np.uint16)
    ds.PixelRepresentation = 0
    ds.PixelData = data.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return ds


def view_item(meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "X", "SRT", meaning
    item = Dataset()
    item.ViewCodeSequence = DicomSequence([code])
    return item


def expect(path: Path, fragment: str, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        read_image(path, **kw)
    assert info.value.path == str(path)
    assert fragment in str(info.value), str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


# ------------------------------------------------------------------------------------------ basics
def test_class_names_and_error_type():
    assert CLASS_NAMES == ("ventilation", "perfusion")
    err = DataError("a/b.dcm", "broken")
    assert str(err) == "a/b.dcm: broken"
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == ("a/b.dcm", "broken", "a/b.dcm: broken")
    aliases = label_aliases({"perfusion": "Q", "ventilation": "V"})
    assert aliases["q"] == 1 and aliases["v"] == 0 and aliases["perfusion"] == 1


# ------------------------------------------------------------------------------------------ NPY
def test_npy_reads_and_squeezes(tmp_path):
    img = blob()
    np.save(tmp_path / "a.npy", img)
    np.save(tmp_path / "b.npy", img[None])
    np.save(tmp_path / "c.npy", img[..., None])
    for name in ("a", "b", "c"):
        pixels, meta = read_image(tmp_path / f"{name}.npy")
        assert pixels.dtype == np.float32 and pixels.shape == img.shape
        np.testing.assert_array_equal(pixels, img)
        assert meta["format"] == "npy"


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: np.where(np.eye(48, dtype=bool), np.nan, 1.0) + blob(), "NaN or Inf"),
        (lambda: np.full((48, 48), 7.0), "constant image: min == max, cannot normalise"),
        (
            lambda: np.zeros((48, 48)),
            "constant image: min == max, cannot normalise (all pixels are 0)",
        ),
        (lambda: blob(8), "image too small: 8x8 pixels"),
        (lambda: np.stack([blob(), blob(), blob(), blob(), blob()], 0), "expected a 2-D image"),
        (lambda: np.array([{"a": 1}] * 4, dtype=object), "Python objects"),
    ],
    ids=["nan", "constant", "all-zero", "8x8", "3d", "object"],
)
def test_npy_bad_inputs(tmp_path, make, fragment):
    arr = make()
    np.save(tmp_path / "bad.npy", arr, allow_pickle=True)
    expect(tmp_path / "bad.npy", fragment)


def test_empty_missing_corrupt_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    expect(tmp_path / "empty.png", "empty file")
    expect(tmp_path / "missing.png", "file not found")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    expect(tmp_path / "bad.png", "PNG")
    Image.fromarray((blob() // 4).astype(np.uint8)).save(tmp_path / "trunc.png")
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    expect(tmp_path / "trunc.png", "corrupt or truncated PNG")
    np.save(tmp_path / "t.npy", blob())
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[: len(raw) - 100])
    expect(tmp_path / "t.npy", "corrupt or truncated NPY")
    (tmp_path / "x.txt").write_text("hello")
    expect(tmp_path / "x.txt", "unsupported file type")


# ------------------------------------------------------------------------------------------ PNG / TIFF
def test_png_grey_rgb_rgba_16bit(tmp_path):
    grey = (blob() % 256).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png")[0], grey)

    rgb = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    pixels, meta = read_image(tmp_path / "rgb.png")
    assert pixels.shape == (40, 50)  # non-square is accepted
    np.testing.assert_allclose(pixels, luma, atol=1e-3)

    rgba = np.concatenate([rgb, np.full((40, 50, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(read_image(tmp_path / "rgba.png")[0], luma, atol=1e-3)

    deep = (blob(scale=40000.0)).astype(np.uint16)
    assert deep.max() > 255
    Image.fromarray(deep).save(tmp_path / "d16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "d16.png")[0], deep)


def test_tiff_16bit(tmp_path):
    deep = blob(scale=30000.0)
    Image.fromarray(deep).save(tmp_path / "a.tif")
    pixels, meta = read_image(tmp_path / "a.tif")
    np.testing.assert_array_equal(pixels, deep)
    assert meta["format"] == "tiff"


# ------------------------------------------------------------------------------------------ DICOM
def test_dicom_pixels_rescale_and_meta(tmp_path):
    img = blob()
    rp = Dataset()
    rp.Radiopharmaceutical = "Tc-99m MAA"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        "C-B1031",
        "SRT",
        "Technetium Tc-99m macroaggregated albumin",
    )
    rp.RadiopharmaceuticalCodeSequence = DicomSequence([code])
    write_dicom(
        tmp_path / "a.dcm",
        img,
        RescaleSlope="2",
        RescaleIntercept="-3",
        SeriesDescription="LUNG PERF ANT",
        ProtocolName="Q scan",
        RadiopharmaceuticalInformationSequence=DicomSequence([rp]),
    )
    pixels, meta = read_image(tmp_path / "a.dcm")
    np.testing.assert_array_equal(pixels, img.astype(np.float32) * 2 - 3)
    assert meta["series_description"] == "LUNG PERF ANT"
    assert meta["protocol_name"] == "Q scan"
    assert meta["patient_id"] == "PAT1" and meta["modality"] == "NM"
    assert "Tc-99m MAA" in meta["radiopharmaceutical"]
    assert "macroaggregated" in meta["radiopharmaceutical"]
    assert meta["frame"] == 0


def test_dicom_monochrome1_inverted_and_rgb(tmp_path):
    img = blob()
    write_dicom(tmp_path / "m1.dcm", img, PhotometricInterpretation="MONOCHROME1")
    pixels, _ = read_image(tmp_path / "m1.dcm")
    expected = img.max() + img.min() - img.astype(np.float32)
    np.testing.assert_array_equal(pixels, expected)
    assert np.argmax(pixels) == np.argmin(img)  # bright is now where counts were low

    rgb = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    write_dicom(tmp_path / "rgb.dcm", rgb)
    pixels, _ = read_image(tmp_path / "rgb.dcm")
    np.testing.assert_allclose(
        pixels, rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32), atol=1e-3
    )


def test_dicom_multiframe_anterior_selection(tmp_path):
    frames = np.stack([blob(seed=1), blob(seed=2) * 3])
    write_dicom(
        tmp_path / "mf.dcm",
        frames,
        DetectorInformationSequence=DicomSequence([view_item("posterior"), view_item("anterior")]),
        DetectorVector=[1, 2],
    )
    pixels, meta = read_image(tmp_path / "mf.dcm")
    np.testing.assert_array_equal(pixels, frames[1])
    assert meta["frame"] == 1 and meta["view"] == "anterior" and meta["n_frames"] == 2
    # per-frame labels (ImageID) also identify it; "LAO" must not count as anterior
    write_dicom(tmp_path / "ids.dcm", frames[::-1], ImageID=["ANT", "POST"])
    pixels, meta = read_image(tmp_path / "ids.dcm")
    np.testing.assert_array_equal(pixels, frames[1])
    assert meta["frame"] == 0


def test_dicom_multiframe_without_view_needs_frame_index(tmp_path):
    frames = np.stack([blob(seed=1), blob(seed=2)])
    write_dicom(tmp_path / "mf.dcm", frames)
    err = expect(tmp_path / "mf.dcm", "set data.frame_index")
    assert "2 frames" in err.reason
    pixels, meta = read_image(tmp_path / "mf.dcm", frame_index=1)
    np.testing.assert_array_equal(pixels, frames[1])
    assert meta["frame"] == 1
    expect(tmp_path / "mf.dcm", "out of range", frame_index=5)


def test_dicom_bad_inputs(tmp_path):
    write_dicom(tmp_path / "a.dcm", blob(64))
    data = (tmp_path / "a.dcm").read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(data[: len(data) - 2000])
    expect(tmp_path / "trunc.dcm", "truncated or corrupt")

    ds = pydicom.dcmread(tmp_path / "a.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    expect(tmp_path / "nopix.dcm", "not an image: no pixel data")

    ds.Modality = "SR"
    ds.save_as(tmp_path / "sr.dcm")
    expect(tmp_path / "sr.dcm", "not an image: a SR object")

    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01\x02" * 10)
    with pytest.raises(DataError) as info:
        read_image(tmp_path / "junk.dcm")
    assert str(info.value).startswith(str(tmp_path / "junk.dcm"))


def test_dicom_compressed(tmp_path):
    img = blob()
    ds = write_dicom(tmp_path / "a.dcm", img)
    ds.compress(RLELossless)  # pydicom's own RLE codec: always decodable
    ds.save_as(tmp_path / "rle.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "rle.dcm")[0], img)

    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:  # pragma: no cover - plugin installed
        pytest.skip("a JPEG-LS plugin is installed here")
    ds = write_dicom(tmp_path / "b.dcm", img)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\x00\x00\xff\xd9"])
    ds.save_as(tmp_path / "jls.dcm")
    err = expect(tmp_path / "jls.dcm", "compressed transfer syntax JPEG-LS")
    assert "install pylibjpeg" in err.reason


# ------------------------------------------------------------------------------------------ folder source
def make_folder(root: Path, n: int = 2) -> None:
    for cls, off in (("perfusion", 0), ("ventilation", 10)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(root / cls / f"{cls[0]}{i}.npy", blob(seed=off + i))


def cfg_folder(root: Path, **kw) -> dict:
    return {"source": "folder", "root": str(root), "on_error": "raise", **kw}


def test_folder_source_labels_ids_patients(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "perfusion" / "nested").mkdir()
    write_dicom(tmp_path / "perfusion" / "nested" / "IM0001", blob(seed=99), PatientID="P-77")
    (tmp_path / "perfusion" / "notes.txt").write_text("not an image")  # ignored, not an error
    studies, errors = load_studies(cfg_folder(tmp_path))
    assert errors == []
    assert all(isinstance(s, Study) for s in studies)
    by_id = {s.id: s for s in studies}
    assert set(by_id) == {"p0", "p1", "v0", "v1", "IM0001"}
    assert by_id["p0"].label == 1 and by_id["v1"].label == 0
    assert by_id["IM0001"].patient_id == "P-77"  # DICOM PatientID
    assert by_id["p0"].patient_id == str(tmp_path / "perfusion" / "p0.npy")  # else the file
    assert by_id["IM0001"].meta["format"] == "dicom"
    assert by_id["p0"].pixels.dtype == np.float32 and by_id["p0"].truth is None


def test_folder_custom_class_dirs_and_unknown_folder(tmp_path):
    for name, seed in (("Q", 0), ("V", 1)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / f"{name}.npy", blob(seed=seed))
    dirs = {"perfusion": "Q", "ventilation": "V"}
    studies, _ = load_studies(cfg_folder(tmp_path, class_dirs=dirs))
    assert {s.id: s.label for s in studies} == {"Q": 1, "V": 0}
    with pytest.raises(DataError) as info:
        load_studies(cfg_folder(tmp_path))
    assert info.value.path == str(tmp_path / "Q")
    assert "unknown label folder 'Q'" in info.value.reason
    assert "'perfusion'" in info.value.reason and "'ventilation'" in info.value.reason


def test_folder_empty_class_and_empty_root(tmp_path):
    make_folder(tmp_path)
    for f in (tmp_path / "ventilation").iterdir():
        f.unlink()
    with pytest.raises(DataError) as info:
        load_studies(cfg_folder(tmp_path))
    assert info.value.path == str(tmp_path / "ventilation")
    assert "no readable ventilation images" in info.value.reason
    studies, _ = load_studies(cfg_folder(tmp_path, allow_empty_class=True))
    assert {s.label for s in studies} == {1}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class folders found"):
        load_studies(cfg_folder(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_studies(cfg_folder(tmp_path / "nope"))


def test_on_error_skip_collects(tmp_path):
    make_folder(tmp_path)
    np.save(tmp_path / "perfusion" / "nan.npy", np.full((48, 48), np.nan))
    (tmp_path / "ventilation" / "empty.png").write_bytes(b"")
    (tmp_path / "stray").mkdir()
    with pytest.raises(DataError):
        load_studies(cfg_folder(tmp_path))
    studies, errors = load_studies(cfg_folder(tmp_path, on_error="skip"))
    assert len(studies) == 4
    reasons = {Path(e.path).name: e.reason for e in errors}
    assert set(reasons) == {"nan.npy", "empty.png", "stray"}
    assert "NaN" in reasons["nan.npy"] and "empty file" in reasons["empty.png"]


def test_duplicates_warn_or_error(tmp_path):
    make_folder(tmp_path)
    data = (tmp_path / "perfusion" / "p0.npy").read_bytes()
    (tmp_path / "ventilation" / "copy.npy").write_bytes(data)
    studies, _ = load_studies(cfg_folder(tmp_path))
    dup = [s for s in studies if s.meta.get("duplicate_of")]
    assert [s.id for s in dup] == ["copy"]
    assert dup[0].meta["duplicate_of"] == str(tmp_path / "perfusion" / "p0.npy")
    with pytest.raises(DataError, match="identical bytes to"):
        load_studies(cfg_folder(tmp_path, duplicates="error"))


@pytest.mark.skipif(os.name == "nt", reason="symlinks")
def test_symlink_loop_is_reported_not_followed(tmp_path):
    make_folder(tmp_path)
    os.symlink(tmp_path / "perfusion", tmp_path / "perfusion" / "loop")
    os.symlink(
        tmp_path / "perfusion" / "self", tmp_path / "perfusion" / "self"
    )  # dangling self-loop
    studies, errors = load_studies(cfg_folder(tmp_path, on_error="skip"))
    assert len(studies) == 4
    assert any("symlink loop" in e.reason for e in errors)
    assert all(Path(e.path).name in ("loop", "self") for e in errors)


def test_label_less_folder(tmp_path):
    for i in range(2):
        np.save(tmp_path / f"x{i}.npy", blob(seed=i))
    studies, _ = load_studies(cfg_folder(tmp_path, class_dirs=None))
    assert [s.label for s in studies] == [None, None]


# ------------------------------------------------------------------------------------------ manifest
def test_manifest_source(tmp_path):
    make_folder(tmp_path / "imgs")
    rows = [
        "path,label,patient_id",
        "imgs/perfusion/p0.npy,Perfusion,A",
        f"{tmp_path / 'imgs' / 'ventilation' / 'v0.npy'},VENTILATION,B",
        "imgs/ventilation/v1.npy,v,",
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = {"source": "manifest", "manifest": str(tmp_path / "m.csv"),
           "class_dirs": {"perfusion": "q", "ventilation": "v"}}  # fmt: skip
    studies, errors = load_studies(cfg)
    assert errors == []
    assert [(s.label, s.patient_id) for s in studies[:2]] == [(1, "A"), (0, "B")]
    assert studies[2].label == 0 and studies[2].patient_id.endswith("v1.npy")

    (tmp_path / "bad.csv").write_text("path,label\nimgs/perfusion/p0.npy,lungs\n")
    with pytest.raises(DataError) as info:
        load_studies({"source": "manifest", "manifest": str(tmp_path / "bad.csv")})
    assert info.value.path == f"{tmp_path / 'bad.csv'}:2"
    assert "unknown label 'lungs'" in info.value.reason and "perfusion" in info.value.reason

    (tmp_path / "gone.csv").write_text(
        "path,label\nimgs/nothing.npy,perfusion\nimgs/perfusion/p1.npy,perfusion\n"
    )
    with pytest.raises(DataError) as info:
        load_studies({"source": "manifest", "manifest": str(tmp_path / "gone.csv")})
    assert info.value.path == str(tmp_path / "imgs" / "nothing.npy")
    assert "listed in" in info.value.reason and "not found" in info.value.reason
    studies, errors = load_studies(
        {
            "source": "manifest",
            "manifest": str(tmp_path / "gone.csv"),
            "on_error": "skip",
            "allow_empty_class": True,
        }  # fmt: skip
    )
    assert len(studies) == 1 and len(errors) == 1

    (tmp_path / "nopath.csv").write_text("file,label\na,perfusion\n")
    with pytest.raises(DataError, match="no 'path' column"):
        load_studies({"source": "manifest", "manifest": str(tmp_path / "nopath.csv")})
    with pytest.raises(DataError, match="manifest file does not exist"):
        load_studies({"source": "manifest", "manifest": str(tmp_path / "none.csv")})


def test_fingerprint_follows_file_changes(tmp_path):
    make_folder(tmp_path)
    cfg = cfg_folder(tmp_path)
    a = source_fingerprint(cfg)
    assert a == source_fingerprint(cfg)
    np.save(tmp_path / "perfusion" / "p0.npy", blob(seed=42, size=50))
    assert source_fingerprint(cfg) != a


def test_bad_config_values(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        load_studies(cfg_folder(tmp_path, on_error="ignore"))
    with pytest.raises(ValueError, match="data.source"):
        load_studies({"source": "s3"})


# ------------------------------------------------------------------------------------------ phantom
@pytest.fixture(scope="module")
def small_cohort():
    phantom = pytest.importorskip("lung_cls.data.phantom")
    return phantom.simulate_cohort(None, 2, 2, 3)


def test_phantom_to_dicom_roundtrip(tmp_path, small_cohort):
    dicomio = pytest.importorskip("lung_cls.data.dicomio")
    for c in small_cohort:
        path = dicomio.write_nm_dicom(
            tmp_path / c.label.__str__() / f"{c.id}.dcm",
            c.image,
            patient_id=c.patient_id,
            series_description="LUNG PERFUSION ANT" if c.label == 1 else "LUNG VENT ANT",
            label_hint=c.label,
        )
        pixels, meta = read_image(path)
        np.testing.assert_array_equal(pixels, c.image.astype(np.float32))
        assert meta["patient_id"] == c.patient_id and meta["modality"] == "NM"
        assert "anterior" in meta["view"].lower()
    c = small_cohort[0]
    path = dicomio.write_nm_dicom(
        tmp_path / "m1.dcm",
        c.image,
        patient_id="X",
        series_description="x",
        photometric="MONOCHROME1",
        rescale_slope=0.5,
        rescale_intercept=-100.0,
    )
    np.testing.assert_array_equal(read_image(path)[0], c.image.astype(np.float32))
    post = small_cohort[1].image
    path = dicomio.write_nm_dicom(
        tmp_path / "ap.dcm",
        None,
        patient_id="X",
        series_description="x",
        frames=[(post, "POSTERIOR"), (c.image, "ANTERIOR")],
    )
    pixels, meta = read_image(path)
    np.testing.assert_array_equal(pixels, c.image.astype(np.float32))
    assert meta["frame"] == 1


def test_phantom_source(small_cohort):
    pytest.importorskip("lung_cls.data.phantom")
    studies, errors = load_studies(
        {"source": "phantom", "n_perfusion": 2, "n_ventilation": 2, "phantom_seed": 3}
    )
    assert errors == [] and len(studies) == 4
    for s, c in zip(studies, small_cohort, strict=True):
        assert s.id == c.id and s.label == c.label and s.patient_id == c.patient_id
        assert s.path == f"phantom://{c.id}"
        np.testing.assert_array_equal(s.pixels, c.image.astype(np.float32))
        assert s.truth["params"]["offset_x"] == c.params["offset_x"]
        assert s.truth["masks"]["lungs"].dtype == bool
