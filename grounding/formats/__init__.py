"""Export labelling records (``predictions.jsonl``) as COCO, YOLO, Pascal VOC, CVAT (for
images 1.1) or Label Studio datasets.

Every exporter streams: records are read one at a time and written straight out, so a
run of a million images exports in constant memory.

Shared rules:

- Coordinates in records are in the *displayed* frame (EXIF orientation applied).
  Dataset readers differ in whether they apply EXIF (OpenCV's ``imread`` does; a bare
  ``PIL.Image.open`` and ``torchvision.io.decode_jpeg`` by default do not), so for
  a source whose EXIF orientation is not 1 the exporters write an upright copy with the
  tag removed: then every reader sees the frame the boxes are in. Such a copy is
  re-encoded (JPEG at quality 95, other formats in their own format) and counted in
  ``ExportStats.upright_copies``; every other image is linked (absolute symlink) or, with
  ``copy=True``, copied byte for byte, never re-encoded.
- ``min_score`` drops boxes and points scored below it. A null score (VLM boxes carry
  none) counts as 1.0, so unscored boxes are always kept.
- Boxes and points whose label matched no class (``class_id`` null) are skipped and
  counted; records with an ``error`` or without a size are skipped and counted; a record
  whose image is missing, unreadable or not the size the record says is skipped and
  named in ``ExportStats.skipped``.
- The output's image and label folders (Label Studio: ``tasks.json`` and
  ``label_config.xml``) must not exist or be empty, else :class:`ExportExists`;
  ``overwrite=True`` replaces a previous export (it never deletes a tree that contains
  the images root).
"""

from __future__ import annotations

from grounding.formats.coco import export_coco
from grounding.formats.common import ExportExists, ExportStats
from grounding.formats.cvat import export_cvat, read_cvat
from grounding.formats.labelstudio import export_labelstudio
from grounding.formats.voc import export_voc, read_voc
from grounding.formats.yolo import export_yolo

__all__ = ["ExportExists", "ExportStats", "export_coco", "export_cvat", "export_labelstudio",
           "export_voc", "export_yolo", "read_cvat", "read_voc"]
