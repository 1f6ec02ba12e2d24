# SPDX-License-Identifier: Apache-2.0
"""xdplb: an XDP L4 load balancer with a Python control plane."""
__version__ = "0.1.0"
