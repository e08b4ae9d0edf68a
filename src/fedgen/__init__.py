"""fedgen: federated training of generative image models across data silos."""

import warnings

# Third-party warnings fedgen knows to be harmless where it uses them; every other warning is shown.
# diffusers' schedulers build numpy arrays from tensors the numpy-1 way (numpy 2 warns; the values are the same)
warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                        category=DeprecationWarning)
