"""What the page and the API say when a file cannot be scored: a status, a code, a sentence.

Reader errors carry the underlying library's message, which for a DICOM file can quote a
header value; none of that is passed on. Each failure class gets its own plain sentence,
written for the person at the workstation, and the API the matching 4xx status.
"""

from __future__ import annotations

from stagewise.data.readers import ImageReadError


class Problem(Exception):
    """A request that cannot be served: HTTP `status`, a stable `code`, a `message` for people."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict:
        return {"error": self.code, "message": self.message}


_FORMATS = "PNG, JPEG or DICOM"

# (start of the reader's reason, status, code, message); the first match wins.
_READ_PROBLEMS = [
    ("the file is empty", 400, "empty_file", "The file is empty (0 bytes); it may be an interrupted copy or download."),
    ("the image declares", 413, "too_large",
     "This image declares more pixels than this server decodes. Send a smaller export of it, or start the server "
     "with a larger --max-image-pixels."),
    ("the DICOM file has", 422, "wrong_kind", "This DICOM file holds several frames (a series, volume or cine loop); "
                                              "only single-frame DICOM images are scored. Send the one image to score "
                                              "as a file of its own."),
    ("not a readable image (UnidentifiedImageError", 415, "not_an_image",
     f"This file is not an image that can be read here. Send a {_FORMATS} file."),
    ("not a readable image", 422, "corrupt_image",
     "This image file is damaged or incomplete (for example a truncated copy) and cannot be read."),
    ("not a readable DICOM file", 422, "corrupt_dicom", "This DICOM file is damaged or incomplete and cannot be read."),
    ("the DICOM file holds no pixel data", 422, "no_pixel_data",
     "This DICOM file holds no image (it is a report or another non-image object)."),
    ("the DICOM pixel data cannot be decoded", 422, "corrupt_dicom",
     ("The image inside this DICOM file cannot be decoded: the file is damaged or incomplete, or compressed in a "
      "format this server cannot read. Export it uncompressed and try again.")),
    ("the DICOM lookup tables or window settings", 422, "corrupt_dicom",
     ("The display settings stored in this DICOM file (window or lookup table) are invalid, so the image cannot be "
      "shown as intended.")),
    ("the gzipped NIfTI file unpacks to more than", 413, "too_large", "This compressed volume is too large to open."),
    ("not a readable NIfTI file", 422, "corrupt_volume", "This NIfTI volume is damaged or incomplete and cannot be read."),
    ("the NIfTI file holds data of shape", 422, "wrong_kind", "This NIfTI file does not hold a 3D volume."),
    ("the NIfTI voxel data cannot be read", 422, "corrupt_volume",
     "This NIfTI volume is damaged or incomplete and cannot be read."),
    ("the NIfTI volume is empty", 422, "corrupt_volume", "This NIfTI volume is empty."),
]


def wrong_kind(found_dims: int, bundle_dims: int) -> Problem:
    found = {2: "a 2D image", 3: "a 3D volume (for example an MRI or CT series)"}.get(found_dims, "multi-dimensional data")
    wanted = {2: "2D images such as a radiograph", 3: "3D volumes"}[bundle_dims]
    return Problem(422, "wrong_kind", f"This file holds {found}; this model scores {wanted}.")


def read_problem(err: ImageReadError) -> Problem:
    for start, status, code, message in _READ_PROBLEMS:
        if err.reason.startswith(start):
            return Problem(status, code, message)
    return Problem(422, "unreadable", f"This file cannot be read as an image. Send a {_FORMATS} file.")
