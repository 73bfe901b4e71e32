"""The OpenCV image pipeline: every decode source and image kind, hostile files,
resize policies with boxes, normalisation, augmentation and drawing."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit import data


def png_bytes(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def rgb_array():
    rng = np.random.default_rng(0)
    array = np.zeros((24, 32, 3), np.uint8)
    array[4:12, 6:20] = [200, 30, 40]
    return array + rng.integers(0, 5, array.shape, dtype=np.uint8)


def test_png_file_bytes_data_url_numpy_and_tensor_agree(tmp_path, rgb_array):
    encoded = png_bytes(Image.fromarray(rgb_array))
    path = tmp_path / "a.png"
    path.write_bytes(encoded)
    url = "data:image/png;base64," + base64.b64encode(encoded).decode()
    expected = torch.from_numpy(rgb_array)
    for source in (str(path), path, encoded, bytearray(encoded), url, rgb_array, expected):
        image = data.load_image(source)
        assert image.dtype == torch.uint8 and image.shape == (24, 32, 3)
        assert torch.equal(image, expected), type(source)
    chw = expected.permute(2, 0, 1).float() / 255
    assert torch.equal(data.load_image(chw), expected)


@pytest.mark.parametrize("fmt,options", [("JPEG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {}),
                                         ("WEBP", {"lossless": True})])
def test_other_formats_decode(fmt, options, rgb_array):
    # Lossy formats are held to PIL's decode of the same bytes (the same libjpeg and
    # libwebp underneath), lossless ones to the original pixels. A mean tolerance
    # of 40/255 passed an all-black image and swapped red and blue.
    encoded = png_bytes(Image.fromarray(rgb_array), fmt, **options)
    image = data.load_image(encoded)
    assert image.shape == (24, 32, 3)
    lossy = fmt == "JPEG" or (fmt == "WEBP" and not options)
    expected = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")) if lossy else rgb_array
    diff = np.abs(image.numpy().astype(int) - expected.astype(int))
    assert diff.max() == 0, (diff.max(), diff.mean())


@pytest.mark.parametrize("mode,progressive", [("RGB", False), ("RGB", True), ("L", False), ("CMYK", False)])
def test_jpeg_pixels_equal_pil_decode(mode, progressive):
    # vlmkit decodes YCbCr and grayscale JPEGs with libjpeg directly (the library
    # PIL uses, same IDCT and upsampling): identical pixels. CMYK goes through OpenCV.
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    encoded = png_bytes(Image.fromarray(array).convert(mode), "JPEG", quality=85, progressive=progressive)
    expected = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")).astype(int)
    diff = np.abs(data.load_image(encoded).numpy().astype(int) - expected).max()
    assert diff <= (1 if mode == "CMYK" else 0)


@pytest.mark.parametrize("size", [(224, 224), (100, 37), (640, 480), (13, 301), (1, 1)])
def test_resize_is_byte_identical_to_pil_bilinear(size):
    # PIL's anti-aliased bilinear (what torchvision's Resize does to PIL images),
    # down and up, integer and fractional factors.
    rng = np.random.default_rng(2)
    array = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR))
    ours = data.resize_image(torch.from_numpy(array), size[1], size[0]).numpy()
    assert np.array_equal(ours, expected)


def test_loader_without_jpeg_draft_matches_pil_and_torchvision(tmp_path):
    from torchvision import transforms
    rng = np.random.default_rng(3)
    with open(tmp_path / "m.jsonl", "w") as f:
        for i, (h, w) in enumerate([(480, 640), (300, 200), (97, 131)]):
            array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / f"{i}.jpg", quality=90)
            f.write(f'{{"image": "{i}.jpg", "text": "x"}}\n')
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    peer = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor(), transforms.Normalize(mean, std)])
    expected = torch.stack([peer(Image.open(tmp_path / f"{i}.jpg").convert("RGB")) for i in range(3)])
    def pixels_255(images):  # back to 0..255 units
        return images * torch.tensor(std).view(1, 3, 1, 1) * 255

    exact = next(iter(data.Loader(tmp_path / "m.jsonl", batch_size=3, image_size=64, normalize="imagenet",
                                  shuffle=False, jpeg_draft=False)))["images"]
    assert (pixels_255(exact) - pixels_255(expected)).abs().max() < 1e-3    # the same bytes, float rounding only
    # Draft decoding (DCT-scaled JPEG decode, the default) is close on average, even on pure noise.
    draft = next(iter(data.Loader(tmp_path / "m.jsonl", batch_size=3, image_size=64, normalize="imagenet",
                                  shuffle=False)))["images"]
    assert (pixels_255(draft) - pixels_255(expected)).abs().mean() < 2.0


def test_corrupt_jpeg_body_raises_value_error():
    encoded = bytearray(png_bytes(Image.fromarray(np.zeros((16, 16, 3), np.uint8)), "JPEG"))
    sof = encoded.index(b"\xff\xc0")
    encoded[sof + 9] = 9                       # 9 colour components: not a JPEG any decoder accepts
    with pytest.raises(ValueError, match="JPEG"):
        data.load_image(bytes(encoded))


def test_gray_alpha_16bit_palette_become_rgb():
    gray = np.full((8, 8), 77, np.uint8)
    assert torch.equal(data.load_image(png_bytes(Image.fromarray(gray))), torch.full((8, 8, 3), 77, dtype=torch.uint8))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255                 # red, half transparent over white -> (255, 128, 128)
    rgba[..., 3] = 128
    out = data.load_image(png_bytes(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == pytest.approx([255, 127, 127], abs=1)
    sixteen = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = data.load_image(png_bytes(Image.fromarray(sixteen, "I;16")))
    assert out[0, 1].tolist() == [4, 4, 4]             # 1000 / 257 rounded
    assert out[7, 7, 0] == round(63000 / 257)
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    out = data.load_image(png_bytes(palette))
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 0, 255]
    assert data.load_image(np.full((5, 6), 9, np.uint8)).shape == (5, 6, 3)


def test_exif_orientation_is_applied():
    array = np.zeros((20, 40, 3), np.uint8)   # wide image, marked "rotate 90 clockwise" (orientation 6)
    array[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    encoded = png_bytes(Image.fromarray(array), "JPEG", exif=exif.tobytes(), quality=95)
    image = data.load_image(encoded)
    assert image.shape == (40, 20, 3)          # displayed upright: tall
    assert image[:20].float().mean() > 200     # the white half ends up on top


def test_hostile_files_raise_clear_errors(tmp_path, rgb_array):
    encoded = png_bytes(Image.fromarray(rgb_array), "JPEG")
    with pytest.raises(ValueError, match="truncated"):
        data.load_image(encoded[: len(encoded) // 2])
    png = png_bytes(Image.fromarray(rgb_array))
    with pytest.raises(ValueError, match="could not decode"):
        data.load_image(png[: len(png) // 2])
    with pytest.raises(ValueError, match="got 0 bytes"):
        data.load_image(b"")
    with pytest.raises(ValueError, match="not a JPEG/PNG"):
        data.load_image(b"this is not an image at all")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        data.load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match="bad.jpg"):
        data.load_image(bad)
    with pytest.raises(ValueError, match="expected a data URL"):
        data.load_image("data:image/png,notbase64")
    with pytest.raises(TypeError, match="expected a path"):
        data.load_image(12)
    with pytest.raises(TypeError, match="uint8 numpy image"):
        data.load_image(np.zeros((4, 4, 3), np.float32))
    # A decompression bomb is refused from its header, before decoding.
    big = png_bytes(Image.new("L", (5000, 5000)))
    assert data.peek_image_size(big) == (5000, 5000)
    with pytest.raises(ValueError, match="exceeds the limit of 1000000 pixels"):
        data.load_image(big, max_pixels=1_000_000)
    assert data.load_image(png_bytes(Image.new("RGB", (1, 1)))).shape == (1, 1, 3)
    assert data.load_image(png_bytes(Image.new("RGB", (300, 2)))).shape == (2, 300, 3)


def test_letterbox_and_flip_move_boxes_exactly():
    image = torch.zeros(100, 200, 3, dtype=torch.uint8)
    image[20:60, 50:90] = 255                     # a white box at x 50..90, y 20..60
    out, boxes, (sx, sy, px, py) = data.letterbox(image, 100, [[50, 20, 90, 60]])
    assert out.shape == (100, 100, 3) and (sx, sy, px, py) == (0.5, 0.5, 0, 25)
    assert boxes == [[25.0, 35.0, 45.0, 55.0]]
    x1, y1, x2, y2 = map(int, boxes[0])
    assert out[y1 + 1:y2 - 1, x1 + 1:x2 - 1].float().mean() > 250      # the box still frames the white area
    flipped, fboxes = data.horizontal_flip(image, [[50, 20, 90, 60]])
    assert fboxes == [[110.0, 20.0, 150.0, 60.0]]
    assert flipped[20:60, 110:150].float().mean() == 255
    pixels, b = data.preprocess(image, 50, "square", normalize="none", boxes=[[50, 20, 90, 60]])
    assert pixels.shape == (3, 50, 50) and b == [[12.5, 10.0, 22.5, 30.0]]


def test_random_resized_crop_is_seeded_and_keeps_boxes_inside():
    image = torch.randint(0, 255, (64, 96, 3), dtype=torch.uint8)
    a = data.random_resized_crop(image, 32, seed=3, boxes=[[10, 10, 80, 50]])
    b = data.random_resized_crop(image, 32, seed=3, boxes=[[10, 10, 80, 50]])
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert all(0 <= v <= 32 for box in a[1] for v in box)
    j1 = data.color_jitter(image, seed=1)
    assert torch.equal(j1, data.color_jitter(image, seed=1)) and not torch.equal(j1, image)


def test_dynamic_resolution_and_tiles():
    # Qwen2-VL: multiples of patch*merge = 28, within the pixel budget.
    h, w = data.dynamic_resolution(480, 640, patch=14, merge=2, min_pixels=56 * 56, max_pixels=200_000)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 200_000 and abs(w / h - 640 / 480) < 0.1
    tokens = (h // 14) * (w // 14) // 4
    h2, w2 = data.dynamic_resolution(960, 1280, 14, 2, 56 * 56, 800_000)
    assert (h2 // 14) * (w2 // 14) // 4 > tokens    # bigger images get more tokens
    assert data.dynamic_resolution(10, 10, 14, 2, 56 * 56, 10**6) == (56, 56)
    with pytest.raises(ValueError, match="aspect ratio"):
        data.dynamic_resolution(1, 500, 14, 2, 1, 10**6)
    tiles, grid = data.tile_image(torch.zeros(100, 200, 3, dtype=torch.uint8), 32, max_tiles=4)
    assert grid == (1, 2) and len(tiles) == 3 and all(t.shape == (32, 32, 3) for t in tiles)


def test_normalization_presets_and_drawing(tmp_path):
    image = torch.full((4, 4, 3), 255, dtype=torch.uint8)
    pixels, _ = data.preprocess(image, 4, normalize="siglip")
    assert torch.allclose(pixels, torch.ones(3, 4, 4))
    pixels, _ = data.preprocess(image, 4, mean=[0, 0, 0], std=[2, 2, 2])
    assert torch.allclose(pixels, torch.full((3, 4, 4), 0.5))
    with pytest.raises(ValueError, match="unknown normalisation preset 'foo'"):
        data.preprocess(image, 4, normalize="foo")
    canvas = torch.zeros(64, 64, 3, dtype=torch.uint8)
    drawn = data.plot_bounding_boxes(canvas, [[8, 20, 40, 50]], ["cat"], path=tmp_path / "boxes.png")
    assert drawn[20:51, 8].sum() > 0 and (tmp_path / "boxes.png").stat().st_size > 0
    assert torch.equal(data.load_image(tmp_path / "boxes.png"), drawn)
    with pytest.raises(ValueError, match="one per box"):
        data.plot_bounding_boxes(canvas, [[1, 2, 3, 4]], ["a", "b"])
