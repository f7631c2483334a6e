"""CT/label reading: formats, DICOM slice checks, HU plausibility, label map in CT space."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import write_dicom_series
from osteo_model.ctio import Geometry, check_hounsfield, check_same_space, read_geometry, read_image, read_study
from osteo_model.errors import InputError


def test_nifti_and_nrrd_read_with_labels(tmp_path, spine_phantom):
    ct, labels = spine_phantom()
    for suffix in (".nii.gz", ".nrrd"):
        sitk.WriteImage(ct, str(tmp_path / f"ct{suffix}"))
        sitk.WriteImage(labels, str(tmp_path / f"lab{suffix}"))
        img, lab = read_study(tmp_path / f"ct{suffix}", tmp_path / f"lab{suffix}")
        assert img.GetSize() == ct.GetSize() and img.GetSpacing() == ct.GetSpacing()
        assert lab.shape == sitk.GetArrayFromImage(labels).shape
        assert set(np.unique(lab)) == {0, 28, 29, 30, 31}


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "ct.png").write_bytes(b"x")
    with pytest.raises(InputError, match="unsupported"):
        read_image(tmp_path / "ct.png")


def test_garbage_file_is_unreadable(tmp_path):
    bad = tmp_path / "ct.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(InputError) as err:
        read_image(bad)
    assert err.value.path == bad


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_truncated_file_is_unreadable(tmp_path, spine_phantom, suffix):
    ct, _ = spine_phantom()
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(ct, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    read_geometry(path)  # the header is intact: only reading the voxels finds the damage
    with pytest.raises(InputError, match="unreadable or truncated"):
        read_image(path)


def test_an_uncompressed_nifti_named_nii_gz_reads_and_its_truncation_is_still_caught(tmp_path, spine_phantom):
    """The input audit: an uncompressed NIfTI named .nii.gz (ITK reads it by its bytes) was quarantined as 'Not a
    gzipped file', since the header checks opened it by its name; they now go by the gzip magic number."""
    ct, _ = spine_phantom()
    sitk.WriteImage(ct, str(tmp_path / "plain.nii"))
    named = tmp_path / "ct.nii.gz"
    named.write_bytes((tmp_path / "plain.nii").read_bytes())
    assert read_image(named).GetSize() == ct.GetSize() and read_geometry(named).size == ct.GetSize()
    data = named.read_bytes()
    named.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="unreadable or truncated"):
        read_image(named)


def test_dicom_series_reads_in_order_with_geometry(tmp_path, spine_phantom):
    ct, _ = spine_phantom()
    folder = write_dicom_series(ct, tmp_path / "dcm")
    img = read_image(folder)
    assert img.GetSize() == ct.GetSize()
    np.testing.assert_allclose(img.GetSpacing(), ct.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(img.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ct))
    assert read_geometry(folder).size == ct.GetSize()


def test_dicom_series_with_missing_slice(tmp_path, spine_phantom):
    folder = write_dicom_series(spine_phantom()[0], tmp_path / "dcm", skip=(30,))
    with pytest.raises(InputError, match="missing 1 slice"):
        read_geometry(folder)
    with pytest.raises(InputError, match="missing"):
        read_image(folder)


def test_dicom_series_with_irregular_slices(tmp_path, spine_phantom):
    folder = write_dicom_series(spine_phantom()[0], tmp_path / "dcm", shift_mm={30: 0.6})
    with pytest.raises(InputError, match="irregular slice spacing"):
        read_geometry(folder)


def test_dicom_slice_of_another_matrix_size_is_named(tmp_path, spine_phantom):
    """A slice from another series (50x50 among 36x32) is named by file, not left to ITK's 'Size: [..]'."""
    ct, _ = spine_phantom()
    folder = write_dicom_series(ct, tmp_path / "dcm")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(folder / "IM0010.dcm"))
    reader.ReadImageInformation()
    odd = sitk.GetImageFromArray(np.zeros((50, 50), np.int16))
    for tag in ("0008|0060", "0020|000d", "0020|000e", "0008|0018", "0020|0037", "0020|0032", "0020|0013"):
        odd.SetMetaData(tag, reader.GetMetaData(tag))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(folder / "IM0010.dcm"))
    writer.Execute(odd)
    with pytest.raises(InputError, match=r"DICOM slice is 50x50 pixels, the series' first slice 36x32") as err:
        read_image(folder)
    assert str(err.value.path).endswith("IM0010.dcm")


def test_truncated_metaimage_reason_is_not_a_stale_errno(tmp_path, spine_phantom):
    """ITK's last line for a truncated .mha is 'Reason: No such file or directory' although the file exists."""
    path = tmp_path / "ct.mha"
    sitk.WriteImage(spine_phantom()[0], str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=r"unreadable or truncated image \(File cannot be read") as err:
        read_image(path)
    assert "No such file" not in err.value.reason


def test_ct_not_in_hounsfield_units(tmp_path, spine_phantom):
    """Raw stored values (HU + 1024, no rescale) put air near 0: refused, naming the CT."""
    ct, labels = spine_phantom()
    folder = write_dicom_series(ct, tmp_path / "raw", stored_offset=1024)
    lab_path = tmp_path / "lab.nii.gz"
    sitk.WriteImage(labels, str(lab_path))
    with pytest.raises(InputError, match="Hounsfield") as err:
        read_study(folder, lab_path)
    assert err.value.path == folder
    ok = write_dicom_series(ct, tmp_path / "hu")
    read_study(ok, lab_path)  # the same data in HU passes


def test_a_narrow_field_of_view_around_the_spine_is_hounsfield(tmp_path):
    """A scan reconstructed around the spine holds little air, clipped to -1024 (the scan's minimum), and much
    bone. Left without its minimum, the split of air from body fell between soft tissue and bone (medians
    ~600 apart), and the bone's median (676-706 HU) was read as the body's: five CTs of `strong_shift`'s
    site_b were quarantined as raw stored values. The same scan as raw stored values is still refused."""
    rng = np.random.default_rng(0)
    hu = np.concatenate([np.full(3_000, -1024.0), rng.normal(-100, 20, 10_000), rng.normal(60, 30, 60_000),
                         rng.normal(700, 150, 27_000)]).reshape(100, 10, 100)
    path = tmp_path / "ct.nii.gz"
    check_hounsfield(hu, path)
    with pytest.raises(InputError, match="Hounsfield"):
        check_hounsfield(hu + 1024, path)


@pytest.mark.parametrize("slope", [2.0, 0.5, 1.5])
def test_ct_with_wrong_rescale_slope_is_refused(tmp_path, slope):
    """A wrong slope keeps the body tissue plausible (fat and muscle stay near 0) while trabecular HU is off by
    the factor, which would shift every T-score: the air, no longer at -1000 HU, gives it away."""
    rng = np.random.default_rng(0)
    # An abdominal field of view: air around the body, fat, muscle and organs, some bone.
    hu = np.concatenate([rng.normal(-1000, 15, 30_000), rng.normal(-100, 20, 25_000),
                         rng.normal(45, 15, 35_000), rng.normal(300, 100, 10_000)]).reshape(100, 10, 100)
    path = tmp_path / "ct.nii.gz"
    check_hounsfield(hu, path)
    with pytest.raises(InputError, match=r"below -300 \(air, lung\) have median -?[0-9]+, expected .*wrong rescale slope") as err:
        check_hounsfield(hu * slope, path)
    assert err.value.path == path


@pytest.mark.parametrize(
    "change, what",
    [
        (lambda img: img[:, :, :-2], "size"),
        (lambda img: (img.SetSpacing((2.0, 2.0, 2.5)), img)[1], "spacing"),
        (lambda img: (img.SetOrigin((-30.0, -20.0, 110.0)), img)[1], "origin"),
        (lambda img: (img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1)), img)[1], "direction"),
    ],
)
def test_label_map_not_in_ct_space(tmp_path, spine_phantom, change, what):
    ct, labels = spine_phantom()
    labels = change(labels)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "lab.nii.gz"))
    with pytest.raises(InputError, match=what) as err:
        read_study(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")
    assert err.value.path == tmp_path / "lab.nii.gz"
    with pytest.raises(InputError, match=what):
        check_same_space(read_geometry(tmp_path / "ct.nii.gz"), read_geometry(tmp_path / "lab.nii.gz"), tmp_path / "lab.nii.gz")


def test_label_map_on_same_grid_in_other_orientation_is_reoriented(tmp_path, spine_phantom):
    """A mask stored with a flipped y axis (as TotalSegmentator writes for DICOM input) covers the same voxels."""
    ct, labels = spine_phantom()
    flipped = sitk.Flip(labels, [False, True, False])
    assert Geometry.of(flipped) != Geometry.of(labels)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(flipped, str(tmp_path / "lab.nii.gz"))
    _, lab = read_study(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")
    np.testing.assert_array_equal(lab, sitk.GetArrayFromImage(labels))


def _edit_nifti_header(path, offset: int, fmt: str, *values) -> None:
    """Overwrite header bytes of a gzipped NIfTI-1 in place, as an old converter or a hand edit would."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    path.write_bytes(gzip.compress(bytes(raw)))


QFORM_SFORM_CODES = (252, "<2h")
PIXDIM_K = (88, "<f")  # pixdim[3]: the slice spacing


@pytest.mark.parametrize("which", ["ct", "lab"])
def test_nifti_without_orientation_is_refused(tmp_path, spine_phantom, which):
    """qform_code = sform_code = 0: ITK would assume LPS, swapping front and back of a RAS-stored volume, so the
    posterior elements would be measured as the vertebral body. The file without orientation is named."""
    for img, name in zip(spine_phantom(), ("ct", "lab")):
        sitk.WriteImage(sitk.DICOMOrient(img, "RAS"), str(tmp_path / f"{name}.nii.gz"))
    read_study(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")  # with its orientation the RAS pair reads
    bad = tmp_path / f"{which}.nii.gz"
    _edit_nifti_header(bad, QFORM_SFORM_CODES[0], QFORM_SFORM_CODES[1], 0, 0)
    for read in (read_geometry, read_image):
        with pytest.raises(InputError, match="no orientation in the header: qform_code and sform_code are both 0") as err:
            read(bad)
        assert err.value.path == bad
    with pytest.raises(InputError, match="no orientation") as err:
        read_study(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")
    assert err.value.path == bad


@pytest.mark.parametrize("spacing, codes, reason", [
    (0.0, (1, 1), r"pixdim\) is 2x2x0 mm, not all positive \(ITK reads 0 as 1 mm.*\), while the sform's axes give 2x2x2 mm"),
    (-2.0, (1, 0), r"pixdim\) is 2x2x-2 mm, not all positive \(ITK reads 0 as 1 mm and a negative size as a flipped axis\)$"),
])
def test_nifti_with_non_positive_slice_spacing_is_refused(tmp_path, spine_phantom, spacing, codes, reason):
    """ITK reads a slice spacing of 0 as 1 mm (wrong scale), a negative one as a flipped axis. Refused even where the
    sform gives the spacing, since a header that contradicts itself is not trustworthy."""
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(spine_phantom()[0], str(path))
    _edit_nifti_header(path, *QFORM_SFORM_CODES, *codes)
    _edit_nifti_header(path, *PIXDIM_K, spacing)
    for read in (read_geometry, read_image):
        with pytest.raises(InputError, match=reason) as err:
            read(path)
        assert err.value.path == path
