"""State-space (Mamba) building blocks: the selective scan and the 2D four-direction SS2D block."""

from mtvision.models.ssm.selective_scan import (
    HAS_MAMBA_SSM,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

__all__ = ["HAS_MAMBA_SSM", "selective_scan", "selective_scan_chunked", "selective_scan_reference"]
