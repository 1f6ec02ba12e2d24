# SPDX-License-Identifier: Apache-2.0
"""Mirror of bpf/decap_abi.h and the decapsulator's names (tests/packet/test_decap.py
compares them with the header and the compiled object)."""
from __future__ import annotations

PROGRAM_NAME = "xdplb_decap"
MAX_LOCAL = 256  # XDPLB_DC_MAX_LOCAL
LOCAL_MAP = "xdplb_dc_local"
STATS_MAP = "xdplb_dc_stats"
MAPS = (LOCAL_MAP, STATS_MAP)
# enum xdplb_dc_counter, in order, as XDPLB_DC_<NAME>.lower()
COUNTERS = ("decapsulated", "not_ipip", "not_local", "malformed", "inner_malformed", "fragment", "error",
            "ecn_drop")
