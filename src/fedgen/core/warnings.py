"""Third-party warnings fedgen knows to be harmless where it uses them; every other warning is shown.

Applied when fedgen is imported, and again by the runtimes that start libraries which reset the warning filters
(Ray, Flower's simulation engine)."""

from __future__ import annotations

import warnings

KNOWN_HARMLESS = (
    # diffusers' schedulers build numpy arrays from tensors the numpy-1 way (numpy 2 warns; the values are the same)
    (DeprecationWarning, r"__array__ implementation doesn't accept a copy keyword"),
    # Ray's notice of a future default; fedgen's virtual silos ask for num_gpus=0 and keep today's behaviour
    (FutureWarning, r"Tip: In future versions of Ray, Ray will no longer override accelerator"),
)


def quiet_known_warnings() -> None:
    for category, message in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)
