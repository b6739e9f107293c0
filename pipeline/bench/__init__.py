"""The benchmark job (``imagetune bench``): stages alone, the pipeline, a plain PyTorch baseline, memory, listing.

Performance claims come from the table this package prints, measured on the machine at hand, never
from a timed unit test.
"""
