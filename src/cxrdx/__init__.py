"""cxrdx: multi-label chest X-ray diagnosis (Chen, Wan & Pan 2023) and what deploying it needs."""

__version__ = "0.1.0"

from cxrdx.findings import FINDINGS  # noqa: E402

__all__ = ["FINDINGS", "__version__"]
