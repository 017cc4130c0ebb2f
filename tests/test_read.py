"""Reading mammograms: DICOM LUTs, photometric inversion, compression, rasters, and clear errors."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless

from cvfast.data.decode import IMAGECODECS, decode
from cvfast.data.read import read_mammogram, read_png, resize, resize_mask, write_png
from cvfast.data.synth.render import ENCODERS, make_dicom
from cvfast.errors import CvfastError


@pytest.fixture
def ramp() -> np.ndarray:
    return (np.arange(64 * 48, dtype=np.uint32) * 13 % 4096).astype(np.uint16).reshape(64, 48)


def test_plain_16bit_dicom_roundtrip_and_metadata(tmp_path, ramp):
    f = tmp_path / "a.dcm"
    px = (ramp.astype(np.uint32) * 16).astype(np.uint16)
    make_dicom(f, px, patient_id="P1", laterality="L", view="MLO", spacing=0.07)
    m = read_mammogram(f)
    assert m.pixels.dtype == np.uint16
    np.testing.assert_array_equal(m.pixels, px)
    assert (m.laterality, m.view, m.pixel_spacing, m.patient_id) == ("L", "MLO", (0.07, 0.07), "P1")


def test_bits_stored_14_scaled_to_full_range(tmp_path):
    px = np.array([[0, 16383], [8192, 100]], np.uint16)
    make_dicom(tmp_path / "a.dcm", px, patient_id="P", bits_stored=14)
    out = read_mammogram(tmp_path / "a.dcm").pixels
    assert out[0, 0] == 0 and out[0, 1] == 65535
    assert abs(int(out[1, 0]) - round(8192 * 65535 / 16383)) <= 1


def test_monochrome1_is_inverted(tmp_path, ramp):
    make_dicom(tmp_path / "m2.dcm", ramp, patient_id="P", bits_stored=12)
    make_dicom(tmp_path / "m1.dcm", ramp, patient_id="P", bits_stored=12, photometric="MONOCHROME1")
    m2, m1 = read_mammogram(tmp_path / "m2.dcm").pixels, read_mammogram(tmp_path / "m1.dcm").pixels
    np.testing.assert_array_equal(m1.astype(int), 65535 - m2.astype(int))


def test_rle_lossless_decodes_identically(tmp_path, ramp):
    make_dicom(tmp_path / "raw.dcm", ramp, patient_id="P")
    make_dicom(tmp_path / "rle.dcm", ramp, patient_id="P", syntax=RLELossless)
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    np.testing.assert_array_equal(read_mammogram(tmp_path / "rle.dcm").pixels, read_mammogram(tmp_path / "raw.dcm").pixels)


def test_voi_window_is_applied(tmp_path):
    px = np.array([[1000, 1999, 2500, 3001, 4000]], np.uint16)
    # window centre 2500 width 1001: below 1999.5 black, above 3000.5 white, linear between (PS3.3 C.11.2.1.2)
    make_dicom(tmp_path / "w.dcm", px, patient_id="P", bits_stored=12, extra={"WindowCenter": 2500, "WindowWidth": 1001})
    out = read_mammogram(tmp_path / "w.dcm").pixels.astype(int)
    assert out[0, 0] == out[0, 1] == 0 and out[0, 3] == out[0, 4] == 65535
    assert abs(out[0, 2] - 32768) < 100


def test_voi_lut_sequence_is_applied(tmp_path):
    px = np.array([[0, 1, 2, 3]], np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]  # 4 entries, first value 0, 8-bit output
    item.add_new(0x00283006, "US", [255, 128, 64, 0])  # LUTData, decreasing: the file says "show this inverted"
    make_dicom(tmp_path / "l.dcm", px, patient_id="P", bits_stored=2, extra={"VOILUTSequence": Sequence([item])})
    out = read_mammogram(tmp_path / "l.dcm").pixels
    np.testing.assert_array_equal(out[0], np.round(np.array([255, 128, 64, 0]) * 65535 / 255).astype(np.uint16))


def test_8bit_voi_lut_with_more_than_256_entries(tmp_path):
    px = np.array([[0, 256, 1000, 4095]], np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.add_new(0x00283006, "US", [i // 16 for i in range(4096)])
    make_dicom(tmp_path / "l.dcm", px, patient_id="P", bits_stored=12, extra={"VOILUTSequence": Sequence([item])})
    np.testing.assert_array_equal(read_mammogram(tmp_path / "l.dcm").pixels[0], np.array([0, 16, 62, 255]) * 257)


def test_modality_rescale_is_applied(tmp_path):
    px = np.array([[0, 100, 200]], np.uint16)
    make_dicom(tmp_path / "r.dcm", px, patient_id="P", bits_stored=8, extra={"RescaleSlope": 2, "RescaleIntercept": 10})
    out = read_mammogram(tmp_path / "r.dcm").pixels.astype(float)
    # output range is [10, 255*2+10]; values map linearly onto 0..65535
    np.testing.assert_allclose(out[0], [0, 200 / 510 * 65535, 400 / 510 * 65535], atol=1)


def test_truncated_dicom_names_file(tmp_path, ramp):
    f = tmp_path / "t.dcm"
    make_dicom(f, ramp, patient_id="P")
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CvfastError, match=r"t\.dcm.*(truncated|corrupt|decoded)"):
        read_mammogram(f)


def test_non_image_file_names_file(tmp_path):
    for name in ("notes.dcm", "notes.png"):
        (tmp_path / name).write_text("this is not an image")
        with pytest.raises(CvfastError, match=name.replace(".", r"\.")):
            read_mammogram(tmp_path / name)


def test_a_transfer_syntax_without_decoder_is_named(tmp_path, ramp):
    f = tmp_path / "video.dcm"
    make_dicom(f, ramp, patient_id="P")
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML  # every lossless still-image syntax has a decoder installed
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    ds.save_as(f)
    with pytest.raises(CvfastError, match=r"video\.dcm: pydicom has no decoder at all for transfer syntax MPEG2"):
        read_mammogram(f)


@pytest.mark.parametrize("syntax", list(ENCODERS), ids=lambda ts: ts.name.split(" (")[0].replace(" ", "-"))
@pytest.mark.parametrize("bits", [12, 16])
def test_every_lossless_transfer_syntax_decodes_to_the_same_pixels(tmp_path, syntax, bits, monkeypatch):
    px = (np.random.default_rng(bits).random((96, 80)) * (2**bits - 1)).astype(np.uint16)
    make_dicom(tmp_path / "raw.dcm", px, patient_id="P", bits_stored=bits)
    make_dicom(tmp_path / "c.dcm", px, patient_id="P", bits_stored=bits, syntax=syntax)
    assert pydicom.dcmread(tmp_path / "c.dcm").file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(decode(pydicom.dcmread(tmp_path / "c.dcm"), "pydicom"), px)
    for backend in ["dicomsdl"] + (["imagecodecs"] if syntax in IMAGECODECS else []):
        ds = pydicom.dcmread(tmp_path / "c.dcm")  # the direct path, really taken: pydicom's own decode is made to fail
        monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(lambda self: pytest.fail(f"{backend} fell back to pydicom")))
        np.testing.assert_array_equal(decode(ds, backend), px)
        monkeypatch.undo()
    np.testing.assert_array_equal(read_mammogram(tmp_path / "c.dcm").pixels, read_mammogram(tmp_path / "raw.dcm").pixels)


@pytest.mark.parametrize("mode,suffix", [("I;16", ".png"), ("L", ".png"), ("I;16", ".tif"), ("L", ".pgm"), ("1", ".png")])
def test_rasters(tmp_path, mode, suffix):
    arr = {"I;16": np.array([[0, 1, 255, 1000]], np.uint16), "L": np.array([[0, 1, 128, 255]], np.uint8),
           "1": np.array([[False, True, True, False]])}[mode]
    f = tmp_path / f"x{suffix}"
    Image.fromarray(arr).save(f)
    out = read_mammogram(f).pixels
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, arr if mode == "I;16" else (arr.astype(np.uint8) * (255 if mode == "1" else 1)).astype(np.uint16) * 257)


def test_png_cache_roundtrip_keeps_16_bits(tmp_path):
    arr = np.random.default_rng(0).integers(0, 65536, (37, 23), dtype=np.uint16)
    write_png(tmp_path / "c.png", arr)
    np.testing.assert_array_equal(read_png(tmp_path / "c.png"), arr)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_resize_shape_and_range():
    arr = np.full((400, 300), 60000, np.uint16)
    out = resize(arr, (128, 96))
    assert out.shape == (128, 96) and out.dtype == np.uint16 and out.min() == 60000
    assert resize(arr, (800, 600)).max() <= 65535


def test_resize_mask_keeps_tiny_lesion():
    m = np.zeros((1000, 800), bool)
    m[500, 400] = True
    out = resize_mask(m, (100, 80))
    assert out.dtype == np.uint8 and out.sum() == 255


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_tiff_with_one_non_finite_pixel_is_refused(tmp_path, bad):
    arr = np.random.default_rng(0).random((20, 16)).astype(np.float32)
    arr[3, 5] = bad
    Image.fromarray(arr).save(tmp_path / "f.tif")
    with pytest.raises(CvfastError, match=r"f\.tif: 1 pixel\(s\) are NaN or infinite \(the first at row 3, column 5\)"):
        read_mammogram(tmp_path / "f.tif")


def test_a_nan_rescale_slope_is_refused(tmp_path, ramp):
    make_dicom(tmp_path / "r.dcm", ramp, patient_id="P", bits_stored=12, extra={"RescaleSlope": "NaN", "RescaleIntercept": 0})
    with pytest.raises(CvfastError, match=r"r\.dcm: .*NaN or infinite"):
        read_mammogram(tmp_path / "r.dcm")


@pytest.mark.parametrize("name", ["c.tif", "c.png", "c.dcm"])
def test_a_blank_image_is_refused(tmp_path, name):
    f = tmp_path / name
    if name == "c.tif":
        Image.fromarray(np.full((20, 16), 0.25, np.float32)).save(f)
    elif name == "c.png":
        write_png(f, np.full((20, 16), 1234, np.uint16))
    else:
        make_dicom(f, np.full((20, 16), 77, np.uint16), patient_id="P", bits_stored=12)
    with pytest.raises(CvfastError, match=rf"{name.replace('.', '[.]')}: every pixel has the same value"):
        read_mammogram(f)
    assert read_mammogram(f, allow_blank=True).pixels.shape == (20, 16)  # an ROI mask may be empty


def test_a_float64_tiff_reads_like_its_float32_copy(tmp_path):
    import tifffile

    arr = np.random.default_rng(1).random((20, 16)) * 1000 - 200
    tifffile.imwrite(tmp_path / "d.tif", arr)
    Image.fromarray(arr.astype(np.float32)).save(tmp_path / "s.tif")
    np.testing.assert_array_equal(read_mammogram(tmp_path / "d.tif").pixels, read_mammogram(tmp_path / "s.tif").pixels)
    arr[0, 0] = np.nan
    tifffile.imwrite(tmp_path / "n.tif", arr)
    with pytest.raises(CvfastError, match=r"n\.tif: 1 pixel\(s\) are NaN"):
        read_mammogram(tmp_path / "n.tif")


def _dicom(path, stored: np.ndarray, signed: bool, syntax=pydicom.uid.ExplicitVRLittleEndian, extra: dict | None = None) -> None:
    """A 16-bit-allocated, 12-bit-stored grey DICOM whose 16-bit words are STORED as given (bits above BitsStored included)."""
    from pydicom.dataset import FileMetaDataset

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PatientID, ds.Modality, (ds.Rows, ds.Columns) = "P", "MG", stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", int(signed)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = stored.astype("<u2").tobytes()
    if syntax != pydicom.uid.ExplicitVRLittleEndian:
        ds.compress(syntax, generate_instance_uid=False)  # pydicom's own RLE encoder: the stored words, bits above 12 included
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("signed,extra", [(False, {}), (True, {}), (False, {"RescaleSlope": 2, "RescaleIntercept": -100}),
                                          (True, {"RescaleSlope": "0.5", "RescaleIntercept": 1000})], ids=["unsigned", "signed", "rescaled", "signed-rescaled"])
def test_every_backend_gives_the_uncompressed_pixels_with_garbage_above_bits_stored(tmp_path, signed, extra, monkeypatch):
    from cvfast.data.decode import BACKENDS

    rng = np.random.default_rng(7)
    values = rng.integers(0, 4096, (40, 32)).astype(np.uint16)  # 12-bit words (two's complement when signed)
    stored = values | (rng.integers(0, 16, values.shape).astype(np.uint16) << 12)  # garbage in the 4 bits above BitsStored
    _dicom(tmp_path / "raw.dcm", stored, signed, extra=extra)
    _dicom(tmp_path / "rle.dcm", stored, signed, syntax=RLELossless, extra=extra)
    reference = decode(pydicom.dcmread(tmp_path / "raw.dcm"), "pydicom")
    expected = ((values.astype(np.int32) ^ 2048) - 2048) if signed else values  # what BitsStored says the pixels are
    np.testing.assert_array_equal(reference.astype(np.int32), expected)
    for name in ("raw.dcm", "rle.dcm"):
        for backend in BACKENDS:
            ds = pydicom.dcmread(tmp_path / name)
            if backend == "dicomsdl" and not signed:  # the direct path, really taken: pydicom's own decode is made to fail
                monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(lambda self: pytest.fail("dicomsdl fell back to pydicom")))
            np.testing.assert_array_equal(decode(ds, backend), reference, err_msg=f"{name} by {backend}")
            monkeypatch.undo()
    full = read_mammogram(tmp_path / "raw.dcm").pixels  # the rescale and the mapping onto 0..65535 on top, by the fastest backend
    np.testing.assert_array_equal(read_mammogram(tmp_path / "rle.dcm").pixels, full)
    assert 20000 < full.mean() < 45000  # 12 bits spread over the range, not saturated by the garbage


@pytest.mark.parametrize("syntax", ["jpeg2000", "jpegls"])
def test_every_backend_keeps_a_codestreams_precision_above_bits_stored(tmp_path, syntax):
    """JPEG 2000 / JPEG-LS: pydicom keeps a 14-bit codestream's values in a 12-bit header (its precision is the stream's);
    clearing the bits above BitsStored in the direct decoders would wrap such images into noise."""
    import imagecodecs
    from pydicom.encaps import encapsulate

    from cvfast.data.decode import BACKENDS

    values = np.random.default_rng(3).integers(0, 1 << 14, (40, 32)).astype(np.uint16)
    _dicom(tmp_path / "x.dcm", values & 0x0FFF, False)
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    if syntax == "jpeg2000":
        stream, ds.file_meta.TransferSyntaxUID = imagecodecs.jpeg2k_encode(values, level=0, bitspersample=14, codecformat="j2k"), pydicom.uid.JPEG2000Lossless
    else:
        stream, ds.file_meta.TransferSyntaxUID = imagecodecs.jpegls_encode(values, level=0), pydicom.uid.JPEGLSLossless
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    reference = decode(pydicom.dcmread(tmp_path / "c.dcm"), "pydicom")
    assert reference.max() > 4095  # pydicom keeps the stream's 14 bits
    for backend in BACKENDS:
        np.testing.assert_array_equal(decode(pydicom.dcmread(tmp_path / "c.dcm"), backend), reference, err_msg=backend)
