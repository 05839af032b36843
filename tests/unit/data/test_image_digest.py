"""The content digest and the perceptual hash a bundle records of its training images."""

import numpy as np
from PIL import Image

from stagewise.data import read_image
from stagewise.data.image_digest import content_digest, dhash, hamming, image_fingerprints, salted_digest


def test_dhash_of_worked_examples():
    # a 9 x 8 image is its own thumbnail: one bit per horizontal pair, set where the left is darker
    rising = np.tile(np.arange(9, dtype=np.float32) / 8, (8, 1))
    assert dhash(rising) == "ffffffffffffffff"
    assert dhash(rising[:, ::-1]) == "0000000000000000"
    stripes = np.tile(np.array([0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=np.float32), (8, 1))
    assert dhash(stripes) == "aa" * 8  # bits 1 0 1 0 1 0 1 0 on every row
    # a larger image is box-averaged first: each 4 x 4 block of a 36 x 32 image is one thumbnail pixel
    assert dhash(np.kron(stripes, np.ones((4, 4), dtype=np.float32))) == "aa" * 8
    assert hamming(["ff" * 8, "aa" * 8], ["00" * 8, "0f" + "00" * 7]).tolist() == [[64, 60], [32, 32]]


def test_dhash_distances_identical_inverted_and_one_pixel_changed():
    img = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    changed = img.copy()
    changed[30, 30] = 1 - changed[30, 30]
    h = dhash(img)
    assert len(h) == 16 and hamming([h], [dhash(img.copy())])[0, 0] == 0
    assert hamming([h], [dhash(1 - img)])[0, 0] == 64  # no ties in random pixels: every comparison flips
    assert hamming([h], [dhash(changed)])[0, 0] <= 2  # one thumbnail cell moves: at most its two comparisons
    assert content_digest(changed) != content_digest(img)
    # a volume: the hash of its mean over the first axis
    assert dhash(np.stack([img, img])) == h


def test_the_pixel_digest_ignores_name_and_format_but_not_the_pixels(tmp_path):
    pixels = (np.random.default_rng(1).random((20, 24)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "renamed-copy.bmp")  # another name and format, the same pixels
    Image.fromarray(pixels).save(tmp_path / "c.tiff")
    edited = pixels.copy()
    edited[0, 0] ^= 1
    Image.fromarray(edited).save(tmp_path / "d.png")
    prints = image_fingerprints([tmp_path / n for n in ("a.png", "renamed-copy.bmp", "c.tiff", "d.png")], workers=2)
    digests = [d for d, _ in prints]
    assert digests[0] == digests[1] == digests[2] != digests[3]
    assert digests[0] == content_digest(read_image(tmp_path / "a.png"))
    assert hamming([prints[0][1]], [prints[3][1]])[0, 0] <= 2
    salt, other = "00" * 16, "11" * 16
    assert salted_digest(salt, "pixels", digests[0]) == salted_digest(salt, "pixels", digests[1])
    assert salted_digest(salt, "pixels", digests[0]) != salted_digest(other, "pixels", digests[0])
    assert salted_digest(salt, "patient", b"p1") != salted_digest(salt, "pixels", b"p1")
