"""Slide reading and resolution handling."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import write_png
from wsi.slide import SlideError, open_slide


def test_aperio_sample_resolution_and_read(cmu_slide):
    with open_slide(cmu_slide) as s:
        assert s.vendor == "aperio"
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499)
        region = s.read_region((100, 200), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8


def test_override_beats_metadata(cmu_slide):
    with open_slide(cmu_slide, mpp=0.25) as s:
        assert s.mpp == 0.25


def test_png_without_mpp_names_file_and_flag(tmp_path, ihc_image):
    p = write_png(tmp_path / "no_res.png", ihc_image)
    with pytest.raises(SlideError) as e:
        open_slide(p)
    msg = str(e.value)
    assert str(p) in msg and "--slide-mpp" in msg and "\n" not in msg


def test_png_with_override_and_with_dpi(tmp_path, ihc_image):
    p = write_png(tmp_path / "ihc.png", ihc_image)
    s = open_slide(p, mpp=0.5)
    assert (s.mpp, s.dimensions, s.vendor) == (0.5, (512, 512), "image")
    np.testing.assert_array_equal(s.read_region((10, 20), 0, (30, 40)), ihc_image[20:60, 10:40])
    # outside the image reads as white background
    assert (s.read_region((500, 500), 0, (20, 20))[15:, 15:] == 255).all()
    # 50800 dpi = 0.5 µm/px
    q = write_png(tmp_path / "ihc_dpi.png", ihc_image, dpi=50800)
    assert open_slide(q).mpp == pytest.approx(0.5, rel=1e-3)
    # a screen-resolution 72 dpi default is not a scanner resolution
    r = write_png(tmp_path / "ihc_72.png", ihc_image, dpi=72)
    with pytest.raises(SlideError, match="--slide-mpp"):
        open_slide(r)


def test_stripped_tiff_resolution_tags(tmp_path, ihc_image):
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, ihc_image, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    s = open_slide(p)
    assert s.mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(s.read_level(0), ihc_image)


def test_missing_and_non_image_files(tmp_path):
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "absent.svs")
    junk = tmp_path / "notes.svs"
    junk.write_text("this is not a slide\n")
    with pytest.raises(SlideError) as e:
        open_slide(junk, mpp=0.5)
    assert str(junk) in str(e.value)
