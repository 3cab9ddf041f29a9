"""The pictures of predictions: image / mask / prediction triptychs, nuclei outlined on their image,
and a contact sheet of a folder's images."""
import math

import numpy as np

import files


def save_triptych(plt, image, truth, prediction, title, path):
    """Image / Mask / Prediction side by side, the nuclei of both label images in colours (one
    per nucleus), so that merged and split nuclei show."""
    from skimage.color import label2rgb

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    pictures = (image, label2rgb(truth, bg_label=0), label2rgb(prediction, bg_label=0))
    for ax, picture, name in zip(axes, pictures, ("Image", "Mask", "Prediction")):
        ax.imshow(picture)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    files.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    print(f"Wrote {path}")


def overlay(image, labels):
    """The image (H, W, 3) with each nucleus of `labels` outlined (its inner boundary) in its own
    colour, the triptychs' colours."""
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    edges = find_boundaries(labels, mode="inner")
    picture = image.copy()
    if not edges.any():
        return picture
    # Colours by rank among the labels, as label2rgb gives the whole image (every nucleus has
    # boundary pixels), at the memory of the boundaries only.
    colours = label2rgb(labels[edges][None], bg_label=0)[0]
    picture[edges] = (colours * 255).round().astype(np.uint8)
    return picture


# The contact sheet: each test image fitted into a TILE x TILE square, a caption strip below.
TILE = 200
CAPTION = 14


def contact_sheet(images, label_images, ids):
    """All the test images in one PIL image, ceil(sqrt(n)) to a row, nuclei outlined at the
    tile's size (outlines drawn at full size would vanish in the shrinking), each captioned with
    the start of its id and its number of nuclei."""
    from PIL import Image, ImageDraw

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + CAPTION)))
    draw = ImageDraw.Draw(sheet)
    for n, (image, labels, id_) in enumerate(zip(images, label_images, ids)):
        scale = TILE / max(image.shape[:2])
        size = (max(round(image.shape[1] * scale), 1), max(round(image.shape[0] * scale), 1))
        small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        small_labels = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
        left, top = (n % columns) * TILE, (n // columns) * (TILE + CAPTION)
        sheet.paste(Image.fromarray(overlay(small, small_labels)), (left, top))
        draw.text((left + 2, top + TILE + 1), f"{id_[:8]}  {labels.max()} nuclei", fill="white")
    return sheet


def save_pictures(images, label_images, ids, out_dir):
    """`out_dir/overlays/<id>.png` for each image (only this run's: older ones removed) and
    `out_dir/contact_sheet.png`; returns the sheet."""
    from PIL import Image

    folder = out_dir / "overlays"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.png"):
        if old.stem not in ids:
            old.unlink()
    for image, labels, id_ in zip(images, label_images, ids):
        picture = Image.fromarray(overlay(image, labels))
        files.write_atomic(folder / f"{id_}.png", lambda tmp: picture.save(tmp, format="PNG"))
    print(f"Wrote {folder}: {len(ids)} test images with their predicted nuclei outlined")
    sheet = contact_sheet(images, label_images, ids)
    path = out_dir / "contact_sheet.png"
    files.write_atomic(path, lambda tmp: sheet.save(tmp, format="PNG"))
    print(f"Wrote {path}")
    return sheet
