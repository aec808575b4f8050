"""fedrad — federated radiology.

Train one diagnostic imaging model across hospital sites without moving patient images.
Sub-packages: :mod:`fedrad.common` (shared plain-Python building blocks),
:mod:`fedrad.client` (the site side), :mod:`fedrad.server` (the coordinator side) and
:mod:`fedrad.simulations` (one-machine research and the demo).
"""

__version__ = "0.1.0"
