"""Aspect-ratio buckets against hand-computed values (sd-scripts BucketManager semantics)."""
import random

import numpy as np
import pytest
from PIL import Image

from library.buckets import (BucketManager, face_crop, face_from_filename, get_crop_ltrb, make_bucket_resolutions,
                             resize_and_crop, resize_filter)


def test_make_bucket_resolutions_512():
    # area 512*512 = 262144; for each width w in 256..1024 (step 64): h = min(1024, (262144 // w) // 64 * 64)
    expected = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
                (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
                (1024, 256)]
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == expected


def test_sdxl_buckets_never_taller_or_wider_than_max_bucket_reso():
    """SDXL 1024x1024 with --min_bucket_reso 256 --max_bucket_reso 2048: a narrow width's area-keeping height
    (1048576 / 256 = 4096) is capped at max_bucket_reso, as sd-scripts does; an uncapped 256x4096 bucket would train
    at a size the user ruled out (and run out of memory)."""
    resos = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    # widths 256..512: 1048576 // w // 64 * 64 = 4096, 3264, 2688, 2304, 2048 -> all capped at 2048
    tallest = {w: max(h for ww, h in resos if ww == w) for w in (256, 320, 384, 448, 512)}
    assert tallest == {256: 2048, 320: 2048, 384: 2048, 448: 2048, 512: 2048}
    # 576: 1048576 // 576 = 1820 -> 1792 (under the cap, kept)
    assert (576, 1792) in resos and (1792, 576) in resos and (2048, 256) in resos
    assert max(max(r) for r in resos) == 2048


def test_make_bucket_resolutions_respects_min_and_square():
    resos = make_bucket_resolutions((1024, 1024), 512, 2048, 64)
    assert (1024, 1024) in resos
    assert all(min(r) >= 512 and max(r) <= 2048 and r[0] % 64 == 0 and r[1] % 64 == 0 for r in resos)
    assert all(r[0] * r[1] <= 1024 * 1024 for r in resos)


@pytest.mark.parametrize("size, bucket, resized", [
    ((1000, 500), (704, 320), (704, 352)),   # ar 2.0: nearest 704/320 = 2.2; width matches, height covers
    ((500, 1000), (320, 704), (352, 704)),   # ar 0.5: nearest 320/704 = 0.4545; height matches
    ((512, 512), (512, 512), (512, 512)),    # exact bucket
    ((300, 300), (512, 512), (512, 512)),    # upscaled
    ((600, 400), (640, 384), (640, 427)),    # ar 1.5: nearest 640/384 = 1.667 (576/448 = 1.286 is further)
])
def test_select_bucket(size, bucket, resized):
    bm = BucketManager((512, 512), min_size=256, max_size=1024, reso_steps=64)
    reso, rs, err = bm.select_bucket(*size)
    assert reso == bucket and rs == resized
    assert err == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])
    assert rs[0] >= bucket[0] and rs[1] >= bucket[1]  # the resized image covers the bucket


@pytest.mark.parametrize("size, bucket, resized", [
    ((300, 200), (256, 192), (300, 200)),     # small: never upscaled, bucket = size floored to the step
    ((1000, 1000), (512, 512), (512, 512)),   # too large: shrunk to the max area
    ((1200, 600), (640, 320), (640, 320)),    # ar 2 shrunk to area 512^2: 640x320 keeps the ratio exactly
    # ar 850/650 = 1.3077 shrunk to area 512^2: 585.49 x 447.73. Width rounded to nearest, then to the step:
    # 585.49 -> 585 -> 576, its height 576 / ar = 440.47 -> 384 (ar 1.5); height 447.73 rounds to 448, its width
    # 448 * ar = 585.85 -> 576 (ar 1.286, closer to 1.308): resized (int(585.85 + 0.5), 448) = (586, 448), bucket
    # (576, 448). Truncating 447.73 to 447 instead would step the height down to 384.
    ((850, 650), (576, 448), (586, 448)),
    ((650, 850), (448, 576), (448, 586)),
])
def test_select_bucket_no_upscale(size, bucket, resized):
    bm = BucketManager((512, 512), reso_steps=64, no_upscale=True)
    reso, rs, _ = bm.select_bucket(*size)
    assert reso == bucket and rs == resized


def test_single_predefined_bucket_when_bucketing_is_off():
    bm = BucketManager((128, 128), predefined=[(128, 128)])
    assert bm.select_bucket(300, 200)[:2] == ((128, 128), (192, 128))
    assert bm.select_bucket(64, 96)[:2] == ((128, 128), (128, 192))


def test_crop_ltrb_like_sd_scripts():
    # bucket 128x128, image 300x200 (ar 1.5): fitted inside the bucket it is 128 x 85.33, centred 21 px from the top
    left, top, right, bottom = get_crop_ltrb((128, 128), (300, 200))
    assert (left, top, right) == (0, 21, 128) and bottom == pytest.approx(21 + 128 / 1.5)
    assert get_crop_ltrb((128, 64), (100, 100)) == (32, 0, 96, 64)


def test_crop_ltrb_left_is_floored_to_a_whole_pixel():
    """The SDXL crop_top_left condition is whole pixels (sd-scripts floors with // 2): bucket 832x1216, image
    1000x1500 (ar 2/3) fits inside as 810.67 x 1216, so left = (832 - 810.67) // 2 = 10, not 10.67. Off values change
    the SDXL time_ids the LoRA is trained with."""
    left, top, right, bottom = get_crop_ltrb((832, 1216), (1000, 1500))
    assert left == 10 and left == int(left) and top == 0 and bottom == 1216
    assert right == pytest.approx(10 + 1216 * 2 / 3)
    left, top, right, bottom = get_crop_ltrb((128, 128), (200, 300))  # 85.33 wide: left = 42.67 // 2 = 21
    assert (left, top, bottom) == (21, 0, 128) and right == pytest.approx(21 + 128 * 2 / 3)


def test_resize_filter_choice():
    assert resize_filter((300, 200), (192, 128), None) == Image.Resampling.BOX  # downscale: area
    assert resize_filter((100, 100), (128, 128), None) == Image.Resampling.LANCZOS  # upscale: lanczos
    assert resize_filter((300, 100), (192, 128), None) == Image.Resampling.LANCZOS  # one side grows
    assert resize_filter((300, 200), (192, 128), "bicubic") == Image.Resampling.BICUBIC


def test_resize_and_crop_centre_and_random():
    arr = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    out, (left, top) = resize_and_crop(img, (128, 128), (192, 128))
    assert out.size == (128, 128) and (left, top) == (32, 0)
    ref = img.resize((192, 128), Image.Resampling.BOX).crop((32, 0, 160, 128))
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    lefts = {resize_and_crop(img, (128, 128), (192, 128), random_crop=True, rng=random.Random(s))[1][0]
             for s in range(30)}
    assert len(lefts) > 5 and all(0 <= x <= 64 for x in lefts)


def test_face_from_filename_reads_detect_face_rotate_names():
    assert face_from_filename("/d/photo_120_80_40_60.png") == (120, 80, 40, 60)
    assert face_from_filename("/d/my_photo_3_120_80_40_60.jpg") == (120, 80, 40, 60)
    assert face_from_filename("/d/photo.png") is None
    assert face_from_filename("/d/a_b_c_d_e.png") is None  # not integers: no face (sd-scripts' int() would raise)
    assert face_from_filename("/d/photo_0_80_40_60.png") is None  # cx 0: sd-scripts' "no face information"
    assert face_from_filename("/d/photo_120_80_0_0.png") is None  # no size: nothing to scale by


def test_face_crop_against_hand_computed_values():
    rng = random.Random(0)
    # 400x300, face 40x40 at (200, 150), crop 64x64, range [2, 2]: scale = 64 / (40 * 2) = 0.8 (above covering,
    # 64/300), so 320x240 with the face at (160, 120); the crop is centred on it: left 160 - 32, top 120 - 32
    assert face_crop((400, 300), (200, 150, 40, 40), (64, 64), (2.0, 2.0), False, rng) == ((320, 240), (128, 88))
    # a face in the corner: the crop stops at the edge
    assert face_crop((400, 300), (10, 10, 40, 40), (64, 64), (2.0, 2.0), False, rng) == ((320, 240), (0, 0))
    # a face larger than the range allows at scale 1: never upscaled (scale capped at 1)
    assert face_crop((400, 300), (200, 150, 20, 20), (64, 64), (2.0, 2.0), False, rng) == ((400, 300), (168, 118))
    # an image smaller than the crop: scaled to cover it (sd-scripts asserts instead)
    assert face_crop((32, 32), (16, 16, 16, 16), (64, 64), (2.0, 2.0), False, rng) == ((64, 64), (0, 0))
    assert face_crop((64, 64), (16, 16, 16, 16), (64, 64), (2.0, 4.0), False, rng) == ((64, 64), (0, 0))


def test_face_crop_draws_the_scale_within_the_range_and_keeps_the_face_in_the_crop():
    rng = random.Random(1)
    scales = []
    for _ in range(200):
        (w, h), (left, top) = face_crop((400, 300), (200, 150, 40, 40), (64, 64), (2.0, 4.0), False, rng)
        scale = w / 400
        scales.append(scale)
        assert 0.4 - 1e-3 <= scale <= 0.8 + 1e-3  # the face is 64/4 to 64/2 pixels: a quarter to a half of the side
        cx, cy = 200 * scale, 150 * scale
        assert abs(left + 32 - cx) <= 3 and abs(top + 32 - cy) <= 3  # centred, jittered by at most 40 // 20 px
    assert min(scales) < 0.5 and max(scales) > 0.7
    for _ in range(50):  # random_crop: shifted anywhere, inside the image
        (w, h), (left, top) = face_crop((400, 300), (200, 150, 40, 40), (64, 64), (2.0, 2.0), True, rng)
        assert (w, h) == (320, 240) and 0 <= left <= 256 and 0 <= top <= 176
