"""NM DICOM writer: real files that pydicom reads back with the same pixels and header facts."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import validate_file_meta
from pydicom.sr.codedict import codes

from lung_cls.data.dicomio import NM_IMAGE_STORAGE, VIEW_CODES, write_nm_dicom


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(40.0, (64, 64)).astype(np.uint16)


def test_round_trip_single_frame(tmp_path):
    img = _image()
    path = write_nm_dicom(
        tmp_path / "q.dcm",
        img,
        patient_id="PH0007",
        series_description="LUNG PERFUSION ANT",
        label_hint=1,
        pixel_spacing_mm=1.5,
    )
    ds = pydicom.dcmread(path)
    assert np.array_equal(ds.pixel_array, img) and ds.pixel_array.dtype == np.uint16
    validate_file_meta(ds.file_meta, enforce_standard=True)
    assert ds.file_meta.MediaStorageSOPClassUID == NM_IMAGE_STORAGE == ds.SOPClassUID
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.preamble == b"\x00" * 128  # a Part 10 file
    assert ds.Modality == "NM" and ds.PatientID == "PH0007" and str(ds.PatientName) == "PH0007"
    assert ds.SeriesDescription == "LUNG PERFUSION ANT" and ds.ProtocolName == "LUNG PERFUSION"
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert pydicom.uid.UID(getattr(ds, kw)).is_valid
    assert (ds.Rows, ds.Columns, ds.NumberOfFrames) == (64, 64, 1)
    assert (ds.BitsAllocated, ds.PixelRepresentation) == (16, 0)
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert [float(v) for v in ds.PixelSpacing] == [1.5, 1.5]
    view = ds.DetectorInformationSequence[0].ViewCodeSequence[0]
    anterior = codes.cid26.AnteriorProjection  # CID 26 Nuclear Medicine Projection
    assert (view.CodeValue, view.CodingSchemeDesignator) == (anterior.value, "SCT")
    assert ds.ViewCodeSequence[0].CodeMeaning == "Anterior projection"
    rp = ds.RadiopharmaceuticalInformationSequence[0]
    assert "MAA" in rp.Radiopharmaceutical
    assert rp.RadiopharmaceuticalCodeSequence[0].CodeValue == "85693008"


def test_ventilation_agents(tmp_path):
    for agent, code in (("DTPA", "430276001"), ("Technegas", "447125008")):
        path = write_nm_dicom(
            tmp_path / f"{agent}.dcm",
            _image(1),
            patient_id="PH0001",
            series_description="LUNG VENT ANT",
            label_hint=0,
            radiopharmaceutical=agent,
        )
        ds = pydicom.dcmread(path)
        rp = ds.RadiopharmaceuticalInformationSequence[0]
        assert rp.RadiopharmaceuticalCodeSequence[0].CodeValue == code
        assert rp.RadiopharmaceuticalRoute == "Inhalation"
        assert ds.ProtocolName == "LUNG VENTILATION"


def test_multi_frame_carries_views_per_detector(tmp_path):
    post, ant = _image(2), _image(3)
    path = write_nm_dicom(
        tmp_path / "mf.dcm",
        None,
        patient_id="PH0002",
        series_description="LUNG VENT",
        frames=[(post, "POSTERIOR"), (ant, "ANT")],
        study_uid="1.2.3.4",
    )
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 2 and ds.pixel_array.shape == (2, 64, 64)
    assert ds.StudyInstanceUID == "1.2.3.4"
    views = [
        ds.DetectorInformationSequence[d - 1].ViewCodeSequence[0].CodeValue
        for d in ds.DetectorVector
    ]
    assert views == [VIEW_CODES["POSTERIOR"][0], VIEW_CODES["ANTERIOR"][0]]
    i_ant = views.index(VIEW_CODES["ANTERIOR"][0])
    assert np.array_equal(ds.pixel_array[i_ant], ant)
    assert np.array_equal(ds.pixel_array[1 - i_ant], post)
    assert list(ds.FrameIncrementPointer) == [0x00540010, 0x00540020]


def test_rescale_and_monochrome1_invert_back(tmp_path):
    img = _image(4)
    path = write_nm_dicom(
        tmp_path / "m1.dcm",
        img,
        patient_id="PH0003",
        series_description="LUNG PERFUSION ANT",
        rescale_slope=0.5,
        rescale_intercept=-10,
        photometric="MONOCHROME1",
    )
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    values = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert not np.array_equal(values, img)  # stored inverted
    restored = values.max() + values.min() - values
    assert np.array_equal(restored, img)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="view"):
        write_nm_dicom(tmp_path / "a.dcm", _image(), patient_id="X", series_description="S",
                       view="SIDEWAYS")  # fmt: skip
    with pytest.raises(ValueError, match="uint16"):
        write_nm_dicom(tmp_path / "b.dcm", _image(), patient_id="X", series_description="S",
                       rescale_slope=0.001)  # fmt: skip
    with pytest.raises(ValueError, match="2-D"):
        write_nm_dicom(tmp_path / "c.dcm", np.zeros(5, np.uint16), patient_id="X",
                       series_description="S")  # fmt: skip
    with pytest.raises(ValueError, match="keyword"):
        write_nm_dicom(tmp_path / "d.dcm", _image(), patient_id="X", series_description="S",
                       NotADicomKeyword=1)  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_extra_keywords_are_written(tmp_path):
    path = write_nm_dicom(tmp_path / "e.dcm", _image(), patient_id="X", series_description="S",
                          AccessionNumber="ACC1")  # fmt: skip
    assert pydicom.dcmread(path).AccessionNumber == "ACC1"
