"""fedgen: federated training of generative image models across data silos."""

from fedgen.core.warnings import quiet_known_warnings

quiet_known_warnings()
