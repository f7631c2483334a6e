"""Reading a site's CT studies and label maps, with the checks that keep bad scans out of the cache.

A CT is a NIfTI/NRRD file or a DICOM series folder (read with SimpleITK, which applies the DICOM
rescale slope/intercept). Every problem is an ``InputError`` naming the file, so preparation can
quarantine that study and carry on.
"""
from __future__ import annotations

import gzip
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import SimpleITK as sitk

from osteo_model.constants import (CT_AIR_CHECK_HU, CT_AIR_CHECK_PERCENTILE, CT_AIR_LIKE_HU, CT_AIR_MEDIAN_HU,
                                   CT_BODY_TISSUE_HU)
from osteo_model.errors import InputError

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
SLICE_TOLERANCE = 0.05
"""Relative deviation of one slice step from the series' median step that counts as irregular."""
SPACE_TOLERANCE = 1e-3
"""Tolerance (mm for spacing/origin, cosine for direction) when comparing two images' geometry."""
HU_SAMPLE_SIZE = 2_000_000
"""Voxels drawn (fixed seed) for the HU check: histograms of that many are stable, and cost ~50 ms."""
AIR_TISSUE_GAP = 800.0
"""Least distance between the medians of air (-1000 HU) and body tissue (fat -100 HU and denser) for a split of
a scan's values to be taken as one of air from body: air and lung lie ~900-1100 below the body's median, in HU
as in raw stored values. Soft tissue and bone lie ~600 apart in a narrow field of view around the spine, which
600 took for air and body (the bone's median read as the body's, the scan refused as raw values)."""
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
"""NIfTI datatype codes of the float types, the only ones that can hold NaN."""


@dataclass(frozen=True)
class Geometry:
    """Physical space of an image, as read from its header (no voxels)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, img: sitk.Image | sitk.ImageFileReader) -> "Geometry":
        return cls(tuple(img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()))


def is_dicom_series(path: Path) -> bool:
    return path.is_dir()


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_file() and not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise InputError(path, f"unsupported image format (expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder)")


def _series_files(folder: Path) -> list[str]:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(folder, "no DICOM series found in folder")
    if len(series) > 1:
        raise InputError(folder, f"folder holds {len(series)} DICOM series; put one series per folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    if len(files) < 2:
        raise InputError(folder, "DICOM series has fewer than two slices")
    return list(files)


def _read_header(file: str | Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(file, f"unreadable image header ({_itk_reason(exc)})") from None
    return reader


def check_slice_positions(folder: Path, files: list[str]) -> float:
    """Check a DICOM series for missing, duplicate or irregularly spaced slices; return the slice step.

    Positions come from ImagePositionPatient projected on the slice normal (from
    ImageOrientationPatient), so gantry order or file names do not matter.
    """
    positions = []
    normal, matrix = None, None
    for f in files:
        header = _read_header(f)
        try:
            ipp = [float(v) for v in header.GetMetaData("0020|0032").split("\\")]
            iop = [float(v) for v in header.GetMetaData("0020|0037").split("\\")]
        except (RuntimeError, ValueError):
            raise InputError(f, "DICOM slice lacks ImagePositionPatient/ImageOrientationPatient") from None
        size = header.GetSize()[:2]
        if normal is None:
            normal, matrix = np.cross(iop[:3], iop[3:6]), size
        elif size != matrix:
            raise InputError(f, f"DICOM slice is {size[0]}x{size[1]} pixels, the series' first slice "
                                f"{matrix[0]}x{matrix[1]}: mixed series?")
        positions.append(float(np.dot(ipp, normal)))
    steps = np.diff(np.sort(positions))
    if np.any(steps < SPACE_TOLERANCE):
        raise InputError(folder, "DICOM series has duplicate slice positions")
    step = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - step)))
    if steps[worst] > 1.5 * step:
        missing = int(round(steps[worst] / step)) - 1
        raise InputError(folder, f"DICOM series is missing {missing} slice(s): gap of {steps[worst]:.2f} mm where the step is {step:.2f} mm")
    if abs(steps[worst] - step) > SLICE_TOLERANCE * step:
        raise InputError(folder, f"DICOM series has irregular slice spacing: {steps[worst]:.2f} mm vs median {step:.2f} mm")
    return step


def check_volume(path: Path, size: tuple[int, ...], components: int) -> None:
    """One 3-D scalar volume, or the study is quarantined (a 4-D series or a 2-D slice is not a CT volume)."""
    if len(size) != 3:
        shape = "x".join(map(str, size))
        raise InputError(path, f"{len(size)}-D image ({shape}); expected one 3-D volume")
    if components != 1:
        raise InputError(path, f"image has {components} values per voxel; expected one 3-D scalar volume")


def read_geometry(path: Path) -> Geometry:
    """Header-only geometry of a CT or label map; validates DICOM slice positions on the way."""
    _check_exists(path)
    if is_dicom_series(path):
        files = _series_files(path)
        step = check_slice_positions(path, files)
        first = _read_header(files[0])
        size = (*first.GetSize()[:2], len(files))
        spacing = (*first.GetSpacing()[:2], step)
        # GDCM sorts the files along the slice normal, so the first file holds the series origin.
        return Geometry(size, spacing, tuple(first.GetOrigin()), tuple(first.GetDirection()))
    header = _read_header(path)
    check_volume(path, tuple(header.GetSize()), header.GetNumberOfComponents())
    check_nifti_geometry(path)
    return Geometry.of(header)


@dataclass(frozen=True)
class _NiftiHeader:
    """The fields of a NIfTI-1/2 header that ITK reads without complaint although they can be wrong."""

    offset: int              # first byte of the voxel data
    end: int                 # byte after the voxel data
    float_dtype: str | None  # numpy dtype of float voxel data, None for integer data
    qform_code: int          # 0: no qform orientation
    sform_code: int          # 0: no sform orientation
    pixdim: tuple[float, float, float]  # voxel size along i, j, k (mm)
    sform: np.ndarray        # 3x4 affine srow_x..z (meaningful only with sform_code > 0)


def _nifti_header(header: bytes) -> _NiftiHeader | None:
    """Parse the first 540 bytes of a NIfTI-1/2 file; None if the file is not NIfTI."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            pixdim = struct.unpack(endian + "8f", header[76:108])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            codes = struct.unpack(endian + "2h", header[252:256])
            sform = struct.unpack(endian + "12f", header[280:328])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            pixdim = struct.unpack(endian + "8d", header[104:168])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            codes = struct.unpack(endian + "2i", header[344:352])
            sform = struct.unpack(endian + "12d", header[400:496])
            break
    else:
        return None
    end = offset + int(np.prod([max(d, 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64)) * bitpix // 8
    dtype = NIFTI_FLOAT_TYPES.get(datatype)
    return _NiftiHeader(offset, end, endian + dtype if dtype else None, int(codes[0]), int(codes[1]),
                        tuple(float(v) for v in pixdim[1:4]), np.asarray(sform, dtype=np.float64).reshape(3, 4))


def _gzipped(path: Path) -> bool:
    """Whether the file's bytes are gzip (its magic number), whatever its name says: ITK reads an uncompressed
    NIfTI named .nii.gz, and a reader that trusted the name quarantined it as 'not a gzipped file'."""
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _open_nifti(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if _gzipped(path) else open(path, "rb")


def _read_nifti_header(path: Path) -> _NiftiHeader | None:
    """The header of a NIfTI file; None if the file is not NIfTI."""
    try:
        with _open_nifti(path) as fh:
            return _nifti_header(fh.read(540))
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(path, f"unreadable image ({exc})") from None


def check_nifti_geometry(path: Path) -> None:
    """Refuse a NIfTI header whose orientation or voxel size ITK would silently make up.

    With qform_code = sform_code = 0 ITK assumes the identity direction (LPS): a volume stored in RAS then
    has front and back swapped, and the posterior elements pass for the vertebral body. A voxel size of 0
    becomes 1 mm (volumes and crops at the wrong scale), a negative one flips that axis. Where the sform
    gives the voxel sizes the header contradicts itself, which is no more trustworthy: refused as well.
    """
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    header = _read_nifti_header(path)
    if header is None:
        return
    if header.qform_code == 0 and header.sform_code == 0:
        raise InputError(path, "no orientation in the header: qform_code and sform_code are both 0, so front/back and "
                               "left/right are unknown (ITK would guess); re-export the NIfTI with its qform/sform")
    if all(d > 0 for d in header.pixdim):
        return
    reason = (f"voxel size in the header (pixdim) is {_mm(header.pixdim)} mm, not all positive "
              "(ITK reads 0 as 1 mm and a negative size as a flipped axis)")
    if header.sform_code > 0:
        sform_mm = _mm(np.linalg.norm(header.sform[:, :3], axis=0))
        reason += f", while the sform's axes give {sform_mm} mm: the header contradicts itself"
    raise InputError(path, reason)


def _mm(values) -> str:
    """Voxel sizes as '0.82x0.82x0'."""
    return "x".join(f"{float(v):g}" for v in values)


def check_nifti_complete(path: Path) -> None:
    """ITK reads a cut-off NIfTI without complaint (the missing voxels come back as zeros).

    Compare the data size the header promises with the file size (or, gzipped, with the size the
    gzip trailer records, modulo 2^32) so a truncated download or copy is caught.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    layout = _read_nifti_header(path)
    try:
        if _gzipped(path):
            with open(path, "rb") as fh:
                fh.seek(-4, 2)
                stored = struct.unpack("<I", fh.read(4))[0]
            complete = layout is None or stored == layout.end % 2**32
        else:
            complete = layout is None or path.stat().st_size >= layout.end
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(path, f"unreadable image ({exc})") from None
    if not complete:
        raise InputError(path, "unreadable or truncated image (file shorter than its header says)")


def _nifti_nonfinite(path: Path) -> int:
    """NaN/Inf voxels in a float NIfTI's own bytes.

    nifticlib (inside ITK) silently replaces them by 0 when reading, which for a CT would be 0 HU,
    so only the file tells. Integer NIfTIs (most CTs) cannot hold NaN and are not read twice.
    """
    with _open_nifti(path) as fh:
        layout = _nifti_header(fh.read(540))
        if layout is None or layout.float_dtype is None:
            return 0
        fh.seek(layout.offset)
        itemsize = np.dtype(layout.float_dtype).itemsize
        left, count = layout.end - layout.offset, 0
        while left > 0:
            chunk = fh.read(min(left, (1 << 24) // itemsize * itemsize))
            if not chunk:
                break
            count += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk, layout.float_dtype))))
            left -= len(chunk)
    return count


def check_finite(path: Path, img: sitk.Image) -> None:
    """NaN or infinite voxels mean a damaged or badly resampled image: never read them as numbers."""
    if img.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    if path.name.lower().endswith((".nii", ".nii.gz")):
        try:
            bad = _nifti_nonfinite(path)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(path, f"unreadable image ({exc})") from None
    else:
        bad = int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(img))))
    if bad:
        raise InputError(path, f"{bad} voxel(s) are NaN or infinite (not a number): damaged image or NaN padding from resampling")


def read_image(path: Path) -> sitk.Image:
    """Read a CT or label map (file or DICOM series folder) with voxels."""
    _check_exists(path)
    try:
        if is_dicom_series(path):
            files = _series_files(path)
            check_slice_positions(path, files)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            img = reader.Execute()
        else:
            check_nifti_complete(path)
            img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"unreadable or truncated image ({_itk_reason(exc)})") from None
    check_volume(path, tuple(img.GetSize()), img.GetNumberOfComponentsPerPixel())
    check_nifti_geometry(path)
    check_finite(path, img)
    return img


def _otsu_threshold(values: np.ndarray) -> float:
    """The threshold that best splits ``values`` into two classes (Otsu 1979), on a 512-bin histogram."""
    counts, edges = np.histogram(values, bins=512)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1]
    s0 = np.cumsum(counts * centres)[:-1]
    w1, s1 = len(values) - w0, float(np.dot(counts, centres)) - s0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - s1 / w1) ** 2
    return float(edges[1 + int(np.nanargmax(between))])


def _sample(ct: np.ndarray) -> np.ndarray:
    """Up to HU_SAMPLE_SIZE voxels drawn with a fixed seed (all of a small volume), as float32."""
    flat = ct.reshape(-1)
    if flat.size > HU_SAMPLE_SIZE:
        flat = flat[np.random.default_rng(0).integers(0, flat.size, HU_SAMPLE_SIZE)]
    return flat.astype(np.float32)


def body_tissue(sample: np.ndarray) -> np.ndarray:
    """The voxels of ``sample`` that lie inside the body, whatever the units.

    Otsu's threshold splits air from body: their medians lie ~1000 apart in HU and in raw stored values
    alike. Tried first without the scan's constant fill (its minimum: outside-FOV padding, which would
    otherwise pass for the air), then with it (where the minimum is the air itself, clipped to one value).
    """
    for values in (sample[sample > sample.min()] if sample.size else sample, sample):
        if values.size and values.max() > values.min():
            threshold = _otsu_threshold(values)
            body = values[values > threshold]
            if np.median(body) - np.median(values[values <= threshold]) > AIR_TISSUE_GAP:
                return body
    return sample


def air_median(sample: np.ndarray) -> float | None:
    """Median of the air-like voxels (below CT_AIR_LIKE_HU, the scan's constant fill left out); None without any."""
    values = sample[sample > sample.min()] if sample.size else sample
    air = values[values < CT_AIR_LIKE_HU]
    return float(np.median(air)) if air.size else None


def check_hounsfield(ct: np.ndarray, path: Path) -> None:
    """Reject a CT that is not in Hounsfield units.

    Every CT field of view holds some air (−1000 HU by definition: outside the body, lungs, bowel).
    Stored values written without the rescale intercept (typically −1024) put air near 0 instead. With
    outside-FOV padding the padding passes for air, so the tissue inside the body decides: fat, muscle,
    organs and bone have their median within CT_BODY_TISSUE_HU, raw stored values lie near +1000. A wrong
    rescale *slope* keeps both of those plausible but moves the air off -1000 HU (CT_AIR_MEDIAN_HU).
    """
    sample = _sample(ct)
    hint = "raw stored values without rescale slope/intercept?"
    low = float(np.percentile(sample, CT_AIR_CHECK_PERCENTILE))
    if low > CT_AIR_CHECK_HU:
        raise InputError(path, f"CT not in Hounsfield units: no air (the {CT_AIR_CHECK_PERCENTILE}th percentile is {low:.0f}, "
                               f"expected below {CT_AIR_CHECK_HU:.0f}); {hint}")
    tissue = body_tissue(sample)
    median = float(np.median(tissue)) if tissue.size else float("nan")
    lo, hi = CT_BODY_TISSUE_HU
    if not lo <= median <= hi:
        raise InputError(path, f"CT not in Hounsfield units: the tissue inside the body has median {median:.0f} "
                               f"(fat, muscle and bone give {lo:.0f} to {hi:.0f} HU); {hint}")
    air = air_median(sample)
    lo, hi = CT_AIR_MEDIAN_HU
    if air is not None and not lo <= air <= hi:
        raise InputError(path, f"CT not in Hounsfield units: the voxels below {CT_AIR_LIKE_HU:.0f} (air, lung) have median "
                               f"{air:.0f}, expected {lo:.0f} to {hi:.0f} HU; wrong rescale slope?")


def _grid(g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-centre corners and per-axis step vectors: what makes two geometries the same grid."""
    direction = np.asarray(g.direction).reshape(3, 3)
    steps = direction * np.asarray(g.spacing)  # column i: one voxel step along index axis i
    corners = np.array([[(n - 1) * bit for n, bit in zip(g.size, bits)] for bits in np.ndindex(2, 2, 2)])
    points = np.asarray(g.origin) + corners @ steps.T
    return points[np.lexsort(np.round(points, 2).T)], np.sort(np.abs(steps), axis=1)


def same_grid(a: Geometry, b: Geometry) -> bool:
    """True when both geometries sample the same physical points, maybe in another axis order/sign."""
    (pa, sa), (pb, sb) = _grid(a), _grid(b)
    return sorted(a.size) == sorted(b.size) and np.allclose(pa, pb, atol=SPACE_TOLERANCE * 10) and np.allclose(
        sa[np.lexsort(sa.T)], sb[np.lexsort(sb.T)], atol=SPACE_TOLERANCE)


def check_same_space(ct: Geometry, labels: Geometry, labels_path: Path) -> None:
    """The label map must lie voxel for voxel on the CT grid (size, spacing, origin, direction).

    A label map on the same grid stored in another axis orientation (e.g. a NIfTI mask of a DICOM
    series) is accepted: ``read_study`` reorients it, which moves voxels without interpolating.
    """
    if same_grid(ct, labels):
        return
    if sorted(ct.size) != sorted(labels.size):
        raise InputError(labels_path, f"label map size {labels.size} differs from CT size {ct.size}")
    for name in ("spacing", "origin", "direction"):
        a, b = np.asarray(getattr(ct, name)), np.asarray(getattr(labels, name))
        if a.shape != b.shape or not np.allclose(a, b, atol=SPACE_TOLERANCE, rtol=SPACE_TOLERANCE):
            raise InputError(labels_path, f"label map {name} {tuple(np.round(b, 4))} differs from CT {name} {tuple(np.round(a, 4))}")
    raise InputError(labels_path, "label map does not lie on the CT's voxel grid")


def _reorient_like(labels: sitk.Image, ct: sitk.Image) -> sitk.Image:
    """Labels on the CT's grid in another axis order: permute/flip them into the CT's voxel order."""
    if Geometry.of(labels) == Geometry.of(ct):
        return labels
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(ct.GetDirection())
    labels = sitk.DICOMOrient(labels, code)
    # Exact on the grid: adopt the CT's header to drop float round-off in origin/direction.
    labels.CopyInformation(ct)
    return labels


def read_study(ct_path: Path, labels_path: Path) -> tuple[sitk.Image, np.ndarray]:
    """Read a CT (checked to be in HU) and its label map (checked to be in the CT's space).

    Returns the CT image (float32 HU) and the label array in numpy (z, y, x) order.
    """
    ct = read_image(ct_path)
    labels = read_image(labels_path)
    check_same_space(Geometry.of(ct), Geometry.of(labels), labels_path)
    labels = _reorient_like(labels, ct)
    if labels.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        label_arr = sitk.GetArrayViewFromImage(labels)
        if not np.all(np.mod(label_arr, 1) == 0):
            raise InputError(labels_path, "label map holds non-integer values; expected integer vertebra ids")
    label_arr = sitk.GetArrayFromImage(labels).astype(np.int32, copy=False)
    if label_arr.size and label_arr.min() < 0:
        raise InputError(labels_path, f"label map holds negative values (min {label_arr.min()}), which no vertebra id is: "
                                      "a CT given as the label map?")
    ct = sitk.Cast(ct, sitk.sitkFloat32)
    check_hounsfield(sitk.GetArrayViewFromImage(ct), ct_path)
    return ct, label_arr


def _itk_reason(exc: Exception) -> str:
    """ITK's own reason for a failed read, without its class and address prefix: its last line may be a
    stale errno ("Reason: No such file or directory" for a truncated file that exists)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    itk = [ln for ln in lines if ln.startswith("ITK ERROR")]
    if itk:
        return re.sub(r"^ITK ERROR: \w+\(0x[0-9a-fA-F]+\): ", "", itk[0])[:200]
    return lines[-1][:200] if lines else type(exc).__name__
