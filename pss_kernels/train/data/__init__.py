"""The trainer's input pipeline: datasets (datasets.py), host-side transforms (transforms.py),
JPEG decoding of only the crop (decode.py), batched device-side augmentation (augment.py).

`from pss_kernels.train.data import build_dataset` (and the rest of datasets.py) works as it did
when the datasets were train/data.py.
"""
from .datasets import (DATASETS, DEFAULT_IMG_SIZE, DIGITS_VAL_FRACTION, IMAGE_EXTENSIONS, DataInfo, ImageFolder,
                       SampleKey, SyntheticImages, TensorImages, Transform, build_dataset, digits_split, find_classes,
                       load_image, require_pillow)

__all__ = ["DATASETS", "DEFAULT_IMG_SIZE", "DIGITS_VAL_FRACTION", "DataInfo", "IMAGE_EXTENSIONS", "ImageFolder",
           "SampleKey", "SyntheticImages", "TensorImages", "Transform", "build_dataset", "digits_split",
           "find_classes", "load_image", "require_pillow"]
